//! The same seed gives the same image on every architecture: both shipped models, generated at a
//! fixed seed, against tensors and PNGs written on x86_64 by the release binary
//! (`tests/fixtures/cross_arch/`, commands in its README). Run under qemu by
//! `cargo test --target aarch64-unknown-linux-gnu` (or tools/cross-check.sh), this is the
//! cross-architecture check; on x86 it guards the references themselves.
//!
//! Tensors must agree within 1e-4 (absolute; samples lie in [-1, 1]). Whether the PNG bytes are
//! identical is printed, not asserted: a difference of one float ulp can flip a pixel's rounding.
//!
//! Also here: the f16 mode against f32 on the same requests, error printed and bounded.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use edge_diffuse::files;
use edge_diffuse::pipeline::{LoadOptions, Pipeline, Precision, Request};
use edge_diffuse::SamplerKind;
use ndarray::{s, Array4};

const CROSS_ARCH_ABS_TOL: f32 = 1e-4;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/cross_arch").join(name)
}

struct Case {
    name: &'static str,
    model: &'static str,
    request: Request,
}

/// Must match the commands in tests/fixtures/cross_arch/README.md.
fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "student-lcm2",
            model: "fmnist-student",
            request: Request { seed: 7, num_images: 2, classes: Some(vec![3, 7]), ..Default::default() },
        },
        Case {
            name: "teacher-ddim4-g2",
            model: "fmnist-teacher",
            request: Request {
                seed: 7,
                num_images: 2,
                classes: Some(vec![1, 8]),
                sampler: Some(SamplerKind::Ddim),
                steps: Some(4),
                guidance: Some(2.0),
                ..Default::default()
            },
        },
    ]
}

fn generate(model: &str, request: &Request, precision: Precision) -> Array4<f32> {
    let opts = LoadOptions { threads: 1, precision, ..Default::default() };
    let mut pipe = Pipeline::load(root().join("models").join(model), opts).expect("model loads");
    pipe.generate(request, &mut |_| ControlFlow::Continue(())).expect("generates").samples
}

fn max_abs_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| if x.is_finite() { m.max((x - y).abs()) } else { f32::INFINITY })
}

fn png_bytes(samples: &Array4<f32>) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("grid.png");
    // Same grid as `sample` draws for 2 images (cols = ceil(sqrt(2))), value range of both cards.
    files::write_png(&path, &files::grid_image(samples, 2, [-1.0, 1.0])).expect("png written");
    std::fs::read(&path).expect("png read")
}

#[test]
fn same_seed_same_image_as_x86() {
    let arch = std::env::consts::ARCH;
    for case in cases() {
        let got = generate(case.model, &case.request, Precision::F32);
        let want = files::read_npy4(&fixture(&format!("{}.npy", case.name))).expect("reference tensor");
        let diff = max_abs_diff(&got, &want);
        let png_same = png_bytes(&got) == std::fs::read(fixture(&format!("{}.png", case.name))).expect("reference png");
        eprintln!(
            "cross-arch {arch} {}: max abs diff vs x86_64 {diff:.2e}, PNG bytes {}",
            case.name,
            if png_same { "identical" } else { "differ" }
        );
        assert!(
            diff <= CROSS_ARCH_ABS_TOL,
            "{}: {arch} vs x86_64 max abs diff {diff:e} > {CROSS_ARCH_ABS_TOL:e}",
            case.name
        );
    }
}

/// f16 inside the graph vs f32, on one image of each case. Without fp16 hardware (x86, or qemu
/// whose /proc/cpuinfo is the host's) tract runs a generic f16 kernel: slow, still correct. CI
/// runs the aarch64 suite as a Cortex-A76 (`QEMU_CPU=cortex-a76 TRACT_CPU_AARCH64_KIND=a75`) so
/// that tract's NEON fp16 kernels run.
#[test]
fn f16_close_to_f32() {
    for case in cases() {
        // One image, at most 2 steps: without fp16 hardware each f16 call takes seconds.
        let steps = case.request.steps.map(|s| s.min(2));
        let request = Request { num_images: 1, steps, ..case.request };
        let f32_out = generate(case.model, &request, Precision::F32);
        let t = Instant::now();
        let f16_out = generate(case.model, &request, Precision::F16);
        let elapsed = t.elapsed().as_secs_f64();
        let diff = max_abs_diff(&f16_out, &f32_out);
        let mean = f16_out.iter().zip(&f32_out).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / f32_out.len() as f64;
        eprintln!(
            "f16 {} {}: max abs diff vs f32 {diff:.2e}, mean {mean:.2e} (samples in [-1, 1]); load + generate {elapsed:.1} s",
            std::env::consts::ARCH,
            case.name
        );
        // A loose bound: f16 keeps ~3 decimal digits; what matters is that the image is the same
        // picture (measured errors are in the README).
        assert!(diff < 0.1, "{}: f16 vs f32 max abs diff {diff}", case.name);
        assert_eq!(f16_out.slice(s![0, .., .., ..]).shape(), [1, 32, 32]);
    }
}
