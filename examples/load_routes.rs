//! Measures the ways of loading a model: time to a runnable batch-1 plan and peak RSS.
//! Run each route in its own process so peak RSS is its own:
//!
//!     cargo run --release --example load_routes -- ROUTE [MODEL_DIR]
//!
//! ROUTE: `mmap` (edge-diffuse's route: memmap2 + protobuf decoded from the map),
//! `tract-path` (tract's own path loader), `read` (the file read into memory, then decoded).

use std::time::Instant;

use edge_diffuse::runtime::Denoiser;
use edge_diffuse::ModelCard;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let route = args.get(1).map(String::as_str).unwrap_or("mmap");
    let dir = args.get(2).map(String::as_str).unwrap_or("models/fmnist-student");
    let card = ModelCard::load(dir)?;
    let t0 = Instant::now();
    let mut d = match route {
        "mmap" => Denoiser::load(&card, 1)?,
        "read" => {
            let bytes = std::fs::read(card.onnx_path())?;
            Denoiser::from_bytes(&bytes, &card, 1, card.onnx_path())?
        }
        "tract-path" => {
            use tract_onnx::prelude::*;
            let m = tract_onnx::onnx().model_for_path(card.onnx_path())?;
            let m = m
                .with_input_fact(0, f32::fact([1, 1, 32, 32]).into())?
                .with_input_fact(1, f32::fact([1]).into())?
                .with_input_fact(2, i64::fact([1]).into())?
                .into_optimized()?
                .into_runnable()?;
            let load = t0.elapsed();
            println!(
                "route tract-path load_s {:.3} peak_rss_mib {:.1}",
                load.as_secs_f64(),
                peak_rss_kib() as f64 / 1024.0
            );
            drop(m);
            return Ok(());
        }
        other => anyhow::bail!("unknown route {other:?}: mmap, read or tract-path"),
    };
    d.prepare(1)?;
    let load = t0.elapsed();
    println!("route {route} load_s {:.3} peak_rss_mib {:.1}", load.as_secs_f64(), peak_rss_kib() as f64 / 1024.0);
    Ok(())
}
