//! Peak memory of `edge-diffuse sample --separate` against the number of images: a run streams
//! each image to its file as it is done, so 100 000 images should peak where 10 do.
//!
//! `cargo bench --bench output_memory [-- SMALL LARGE]` (default 10 and 100000). Each count runs
//! once, in a fresh temporary folder, on the bundled student with 1 step and 1 thread; the peak
//! resident set of each child is read from `wait4`. Prints one line per run and the ratio.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Runs one `sample --separate` of `images` images into `dir`; returns its peak RSS in KiB.
// The child is reaped by `wait4`, which also reports its peak memory, not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn peak_rss_kib(dir: &Path, images: usize) -> i64 {
    let child = Command::new(env!("CARGO_BIN_EXE_edge-diffuse"))
        .args(["sample", "--quiet", "--separate", "--steps", "1", "--threads", "1", "--class", "all"])
        .arg("--num-images")
        .arg(images.to_string())
        .arg("--out")
        .arg(dir.join("img.png"))
        .spawn()
        .expect("edge-diffuse starts");
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "edge-diffuse failed: status {status}");
    let files = std::fs::read_dir(dir).expect("output folder").count();
    assert_eq!(files, images, "one file per image");
    usage.ru_maxrss
}

fn main() {
    let counts: Vec<usize> =
        std::env::args().skip(1).filter(|a| !a.starts_with("--")).filter_map(|a| a.parse().ok()).collect();
    let (small, large) = match counts[..] {
        [s, l, ..] => (s, l),
        _ => (10, 100_000),
    };
    let mut peaks = Vec::new();
    for images in [small, large] {
        let dir = tempfile::tempdir().expect("temporary folder");
        let t = Instant::now();
        let kib = peak_rss_kib(dir.path(), images);
        let s = t.elapsed().as_secs_f64();
        println!("{images:>8} images --separate: peak RSS {:.1} MiB, {s:.1} s", kib as f64 / 1024.0);
        peaks.push(kib as f64);
    }
    println!("peak RSS {large} / {small} images: {:.3}", peaks[1] / peaks[0]);
}
