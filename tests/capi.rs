//! The C API end to end, with the system C compiler: builds the C library with the `capi`
//! feature (a nested `cargo rustc` on this target directory, so plain `cargo test` covers it),
//! compiles `examples/c/main.c` against `include/edge_diffuse.h`, runs its self-test (error
//! codes for NULL pointers, short buffers, cancelling, bad values; the in-memory route) and
//! checks that the image it writes is byte for byte the Rust API's for the same seed and class.
//!
//! Set `EDGE_DIFFUSE_SKIP_CAPI=1` to skip it on a machine without a C compiler.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;

use edge_diffuse::{LoadOptions, Pipeline, Request};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The profile directory this test was built in (`target/debug`), from its own path
/// (`target/debug/deps/capi-…`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the C library, then the C example against it; returns the program.
///
/// The test links the shared library, stripped of debug information: a debug-profile static
/// library holds every dependency's debug information (1.3 GB here) and takes ~20 s to link
/// into each program, where the stripped `.so` is 48 MB and links in under a second. The static
/// library is the same code; README "Embedding" shows how to build and link it.
fn build_c_example() -> PathBuf {
    let profile = profile_dir();
    let target = profile.parent().expect("the target directory").to_path_buf();
    let release = profile.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(repo())
        .args(["rustc", "--lib", "--features", "capi", "--crate-type", "cdylib", "--target-dir"])
        .arg(&target);
    if release {
        build.arg("--release");
    }
    run(build.args(["--", "-C", "strip=debuginfo"]));
    let lib = profile.join("libedge_diffuse.so");
    assert!(lib.is_file(), "{} was not built", lib.display());

    let exe = target.join("capi-example");
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let mut rpath = std::ffi::OsString::from("-Wl,-rpath,");
    rpath.push(&profile);
    run(Command::new(cc)
        .args(["-std=c99", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(repo().join("include"))
        .arg("-o")
        .arg(&exe)
        .arg(repo().join("examples/c/main.c"))
        .arg("-L")
        .arg(&profile)
        .arg(rpath)
        .args(["-ledge_diffuse", "-lm"]));
    exe
}

#[test]
fn c_example_builds_passes_its_selftest_and_matches_the_rust_api() {
    if std::env::var_os("EDGE_DIFFUSE_SKIP_CAPI").is_some() {
        eprintln!("skipped: EDGE_DIFFUSE_SKIP_CAPI is set");
        return;
    }
    let exe = build_c_example();
    let model = repo().join("models/fmnist-student");

    let out = run(Command::new(&exe).arg("--selftest").arg(&model));
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("{text}");
    assert!(text.contains("checks passed"), "{text}");

    let tmp = tempfile::tempdir().unwrap();
    let (pgm, raw) = (tmp.path().join("sneaker.pgm"), tmp.path().join("sneaker.f32"));
    let out = run(Command::new(&exe).arg(&model).args(["7", "sneaker"]).arg(&pgm).arg(&raw));
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("{text}");
    assert!(text.contains("32x32x1"), "{text}");

    let mut pipe = Pipeline::load(&model, LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let req = Request { seed: 7, num_images: 1, classes: Some(vec![7]), ..Default::default() };
    let gen = pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap();
    let samples = gen.samples.as_slice().unwrap();
    let mut pixels = vec![0u8; samples.len()];
    pipe.pixels_into(samples, &mut pixels).unwrap();

    let header = b"P5\n32 32\n255\n";
    let file = std::fs::read(&pgm).unwrap();
    assert_eq!(&file[..header.len()], header);
    assert!(file[header.len()..] == pixels[..], "the C program's pixels differ from the Rust API's");
    let floats: Vec<f32> =
        std::fs::read(&raw).unwrap().chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(floats.len(), samples.len());
    if std::env::var_os("EDGE_DIFFUSE_TEST_RUNNER").is_some() {
        // Under a cross runner (tools/cross-check.sh) the C program and its library are built
        // for and run on the host while this test runs on the target: the same seed then agrees
        // to rounding, as in tests/cross_arch.rs, not to the bit (armv7 under qemu: ~1e-6).
        let worst = floats.iter().zip(samples).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "the C program's samples differ from the Rust API's by {worst}");
    } else {
        let same = floats.iter().zip(samples).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "the C program's samples differ from the Rust API's");
    }
}
