//! A firmware-style loop: load the model once, then generate one image per trigger into buffers
//! allocated once, reporting each image's latency and the process's resident memory.
//!
//!     cargo run --release --example firmware_loop [-- [--images N] [--stdin] [--threads T] [MODEL_DIR]]
//!
//! Triggers come from a timer (`--images N`, default 20, back to back) or, with `--stdin`, one
//! per line on standard input (a line may name a class, e.g. `sneaker`; an empty line takes the
//! next class in turn). Each image prints `image  class  ms  RSS`; the end prints the latency
//! spread and the RSS growth after the first image, which stays at zero when nothing leaks.
//! Cancellation: a step callback returning `Break` stops an image; here a deadline of 10 s per
//! image shows how.

use std::io::BufRead;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use edge_diffuse::{LoadOptions, Pipeline, Request};

/// Current resident set size in KiB (VmRSS in /proc/self/status), 0 where unavailable.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Args {
    images: usize,
    stdin: bool,
    threads: usize,
    model: std::path::PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        images: 20,
        stdin: false,
        threads: 1,
        model: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            let v = it.next().ok_or_else(|| anyhow::anyhow!("{name}: expected a value"))?;
            v.parse().map_err(|e| anyhow::anyhow!("{name}: expected a number, got {v:?}: {e}"))
        };
        match a.as_str() {
            "--images" => args.images = value("--images")?,
            "--threads" => args.threads = value("--threads")?,
            "--stdin" => args.stdin = true,
            s if s.starts_with("--") => anyhow::bail!("unknown option {s}"),
            dir => args.model = dir.into(),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rss_start = rss_kib();
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&args.model, LoadOptions { threads: args.threads, ..Default::default() })?;
    let names: Vec<String> = pipe.card().classes.as_ref().map(|c| c.names.clone()).unwrap_or_default();
    println!(
        "loaded {} in {:.0} ms ({} threads); RSS {:.1} MiB before load, {:.1} MiB after",
        args.model.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        args.threads,
        rss_start as f64 / 1024.0,
        rss_kib() as f64 / 1024.0
    );

    // Everything a trigger needs is allocated here, once.
    let mut req = Request { num_images: 1, classes: (!names.is_empty()).then(|| vec![0]), ..Default::default() };
    let mut samples = vec![0f32; pipe.output_len(&req)];
    let mut pixels = vec![0u8; samples.len()];
    let deadline = Duration::from_secs(10);

    let triggers: Box<dyn Iterator<Item = String>> = if args.stdin {
        Box::new(std::io::stdin().lock().lines().map_while(Result::ok))
    } else {
        Box::new(std::iter::repeat_n(String::new(), args.images))
    };
    println!("{:>5} {:>12} {:>9} {:>9} {:>10}", "image", "class", "ms", "RSS MiB", "pixel sum");
    let mut latencies = Vec::new();
    let mut rss_first = None;
    let mut rss_last = 0;
    for (i, line) in triggers.enumerate() {
        if let Some(classes) = req.classes.as_mut() {
            let label = match line.trim() {
                "" => i as i64 % names.len() as i64,
                name => match pipe.card().class_label(name) {
                    Ok(l) => l,
                    Err(e) => {
                        println!("{i:>5} skipped: {e}");
                        continue;
                    }
                },
            };
            classes[0] = label;
        }
        req.seed = i as u64;
        let start = Instant::now();
        let run = pipe.generate_into(&req, &mut samples, &mut |_| {
            if start.elapsed() > deadline {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let Err(e) = run {
            println!("{i:>5} failed: {e}");
            continue;
        }
        pipe.pixels_into(&samples, &mut pixels)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let rss = rss_kib();
        rss_first.get_or_insert(rss);
        rss_last = rss;
        latencies.push(ms);
        let class = req.classes.as_ref().map(|c| names[c[0] as usize].as_str()).unwrap_or("-");
        let sum: u64 = pixels.iter().map(|&p| p as u64).sum();
        println!("{i:>5} {class:>12} {ms:>9.1} {:>9.1} {sum:>10}", rss as f64 / 1024.0);
    }
    if latencies.is_empty() {
        println!("no images");
        return Ok(());
    }
    latencies.sort_by(f64::total_cmp);
    let first = rss_first.unwrap_or(0);
    println!(
        "{} images: latency min {:.1} ms, median {:.1} ms, max {:.1} ms; RSS after image 1 {:.1} MiB, at the end {:.1} MiB ({:+} KiB)",
        latencies.len(),
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        first as f64 / 1024.0,
        rss_last as f64 / 1024.0,
        rss_last as i64 - first as i64
    );
    Ok(())
}
