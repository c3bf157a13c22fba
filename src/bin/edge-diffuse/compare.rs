//! `edge-diffuse bench --compare`: every path this CPU can run a model on, measured in one go
//! and interleaved, so that one command on a board reports them all with their ratios:
//! tract's im2col convolutions against ours, float32 against float16 arithmetic (where the CPU
//! has it), at one thread and at every core.

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::Result;
use edge_diffuse::pipeline::{LoadOptions, Pipeline, Request};

use crate::bench::BenchArgs;

/// One way of running the model.
struct Way {
    convolution: &'static str,
    precision: &'static str,
    threads: usize,
    pipe: Pipeline,
    steps_ms: Vec<f64>,
}

/// Whether the CPU has float16 arithmetic, without which tract's float16 plans run a generic
/// kernel many times slower than float32 (not worth a board's minutes).
fn f16_arithmetic() -> bool {
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("fp16");
    #[cfg(not(target_arch = "aarch64"))]
    false
}

pub fn run(a: &BenchArgs, model: &Path) -> Result<()> {
    let cores = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut threads = vec![1, cores];
    threads.dedup();
    let precisions: &[&str] = if f16_arithmetic() { &["f32", "f16"] } else { &["f32"] };
    let sampler = a.sampler.as_deref().map(str::parse::<edge_diffuse::sampler::SamplerKind>).transpose()?;
    let mut paths = Vec::new();
    for &t in &threads {
        for &precision in precisions {
            for convolution in ["im2col", "winograd"] {
                let opts = LoadOptions {
                    precision: crate::parse_flag(precision)?,
                    convolution: crate::parse_flag(convolution)?,
                    plan_cache: crate::parse_flag(&a.plan_cache)?,
                    weights: crate::parse_flag(&a.weights)?,
                    threads: t,
                    ..Default::default()
                };
                let pipe = Pipeline::load(model, opts)?;
                paths.push(Way { convolution, precision, threads: t, pipe, steps_ms: Vec::new() });
            }
        }
    }
    // A warm-up image each, then rounds of `runs` images per path in turn, so that a board
    // warming up or throttling affects every path alike.
    const ROUNDS: usize = 3;
    for round in 0..=ROUNDS {
        for path in &mut paths {
            let runs = if round == 0 { 1 } else { a.runs };
            for i in 0..runs {
                let classes = path.pipe.card().classes.as_ref().map(|_| vec![0]);
                let req = Request {
                    seed: (round * a.runs + i) as u64,
                    num_images: 1,
                    sampler,
                    steps: a.steps,
                    guidance: a.guidance,
                    classes,
                    prompt: path.pipe.takes_text().then(|| format!("{} {i}", a.prompt)),
                    ..Default::default()
                };
                let mut times = Vec::new();
                path.pipe.generate(&req, &mut |s| {
                    times.push(s.elapsed.as_secs_f64() * 1e3);
                    ControlFlow::Continue(())
                })?;
                if round > 0 {
                    path.steps_ms.extend(times);
                }
            }
        }
    }
    let median = |path: &Way| {
        let mut v = path.steps_ms.clone();
        v.sort_by(f64::total_cmp);
        crate::bench::percentile(&v, 0.5)
    };
    let medians: Vec<f64> = paths.iter().map(median).collect();
    // Each path against tract's im2col float32 path at the same threads.
    let baseline = |t: usize| {
        paths.iter().zip(&medians).find(|(p, _)| p.threads == t && p.convolution == "im2col" && p.precision == "f32")
    };
    let rows: Vec<serde_json::Value> = paths
        .iter()
        .zip(&medians)
        .map(|(p, &ms)| {
            let base = baseline(p.threads).map_or(f64::NAN, |(_, &b)| b);
            serde_json::json!({
                "convolution": p.convolution,
                "precision": p.precision,
                "threads": p.threads,
                "step_ms_median": ms,
                "steps_measured": p.steps_ms.len(),
                "vs_im2col_f32": ms / base,
            })
        })
        .collect();
    let report = serde_json::json!({
        "model": paths[0].pipe.card().model.name,
        "cpu": crate::bench::cpu_model(),
        "arch": std::env::consts::ARCH,
        "f16_arithmetic": f16_arithmetic(),
        "rounds": ROUNDS,
        "runs_per_round": a.runs,
        "weights": a.weights,
        "paths": rows,
    });
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{report}")?;
    } else {
        let text = |key: &str| report[key].as_str().unwrap_or_default().to_string();
        writeln!(out, "{} on {} ({ROUNDS} rounds of {} images per path)", text("model"), text("cpu"), a.runs)?;
        writeln!(
            out,
            "{:<11} {:<9} {:>7} {:>10} {:>14}",
            "convolution", "precision", "threads", "step ms", "vs im2col f32"
        )?;
        for row in &rows {
            writeln!(
                out,
                "{:<11} {:<9} {:>7} {:>10.3} {:>13.2}x",
                row["convolution"].as_str().unwrap_or(""),
                row["precision"].as_str().unwrap_or(""),
                row["threads"],
                row["step_ms_median"].as_f64().unwrap_or(f64::NAN),
                row["vs_im2col_f32"].as_f64().unwrap_or(f64::NAN),
            )?;
        }
    }
    Ok(())
}
