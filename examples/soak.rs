//! Soak test: one pipeline, many requests, flat memory.
//!
//!     cargo run --release --example soak [-- IMAGES [MODEL_DIR]]
//!
//! Loads the bundled fmnist-student once through the library, then generates IMAGES (default
//! 1000) images, one request per image with seed `i` and class `i % 10`, on the card's default
//! sampler and steps. Resident memory (VmRSS in /proc/self/status) is sampled after every 100th
//! image and printed as a table. Exits with status 1 when the RSS after the last sample exceeds
//! the RSS after image 100 by more than 2 MiB: a long-running process must not grow per image.

use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::Instant;

use edge_diffuse::pipeline::{LoadOptions, Pipeline, Request};

/// Allowed growth of RSS between image 100 and the last image.
const SLACK_KIB: u64 = 2 * 1024;
/// Images between RSS samples.
const EVERY: usize = 100;

/// Current resident set size in KiB (VmRSS), or 0 where /proc is not available.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let images: usize = match args.get(1) {
        Some(n) => n.parse().map_err(|e| anyhow::anyhow!("IMAGES: expected a count, got {n:?}: {e}"))?,
        None => 1000,
    };
    anyhow::ensure!(images >= EVERY, "IMAGES: expected at least {EVERY}, got {images}");
    let dir = match args.get(2) {
        Some(d) => d.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student"),
    };

    let before_load = rss_kib();
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&dir, LoadOptions::default())?;
    let classes = pipe.card().classes.as_ref().map(|c| c.names.len() as i64);
    println!(
        "soak: {} ({} threads), {images} images, one request each; RSS before load {:.1} MiB, after load {:.1} MiB ({:.2} s)",
        dir.display(),
        pipe.denoiser().threads(),
        mib(before_load),
        mib(rss_kib()),
        t0.elapsed().as_secs_f64()
    );
    println!("{:>6} {:>10} {:>14} {:>12}", "image", "RSS MiB", "vs 100 (KiB)", "ms/image");

    let mut at_100 = None;
    let mut last = 0;
    let mut checksum = 0.0f64;
    let mut window = Instant::now();
    for i in 0..images {
        let req = Request {
            seed: i as u64,
            num_images: 1,
            classes: classes.map(|n| vec![i as i64 % n]),
            ..Default::default()
        };
        let out = pipe.generate(&req, &mut |_| ControlFlow::Continue(()))?;
        // Use the result, so nothing can be optimized away.
        checksum += out.samples.iter().map(|&v| v as f64).sum::<f64>();
        let done = i + 1;
        if done % EVERY == 0 {
            let rss = rss_kib();
            let base = *at_100.get_or_insert(rss);
            let ms = window.elapsed().as_secs_f64() * 1e3 / EVERY as f64;
            println!("{done:>6} {:>10.1} {:>+14} {ms:>12.1}", mib(rss), rss as i64 - base as i64);
            window = Instant::now();
            last = rss;
        }
    }
    let base = at_100.expect("at least 100 images");
    let growth = last as i64 - base as i64;
    println!(
        "RSS growth from image {EVERY} to image {images}: {growth:+} KiB (limit +{SLACK_KIB} KiB); checksum {checksum:.3}; total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if growth > SLACK_KIB as i64 {
        eprintln!("soak: FAILED, RSS grew by {growth} KiB (more than {SLACK_KIB} KiB) over {} images", images - EVERY);
        return Ok(ExitCode::FAILURE);
    }
    println!("soak: ok (flat)");
    Ok(ExitCode::SUCCESS)
}
