//! End to end: the shipped models through tract, the pipeline and the command line, against
//! PyTorch and a diffusers-pipeline run (fixtures in `tests/fixtures/e2e/`, written by
//! `tools/gen_e2e_reference.py`; no Python at test time).
//!
//! * the denoiser alone equals the PyTorch checkpoint to 1e-4 (absolute);
//! * `Pipeline::generate` equals diffusers' standard loop (DDIM, Euler, LCM schedulers configured
//!   from the card, onnxruntime as the model, classifier-free guidance) to a relative error of
//!   1e-4, and so does the `sample` command with `--noise`/`--save-tensor`;
//! * the command line is deterministic in its seed.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use edge_diffuse::pipeline::{GuidanceBatching, LoadOptions, Pipeline, Request};
use edge_diffuse::runtime::{Convolution, Denoiser};
use edge_diffuse::sampler::{self, SamplerKind, SamplerOptions};
use edge_diffuse::{Error, ModelCard};
use ndarray::{s, Array1, Array4, ArrayD, Ix4};
use ndarray_npy::ReadNpyExt;
use serde_json::Value;

/// Denoiser vs PyTorch: max absolute difference.
const DENOISER_ABS_TOL: f32 = 1e-4;
/// Whole runs vs diffusers: max |got - ref| / max |ref|.
const PIPELINE_REL_TOL: f64 = 1e-4;
/// Sampler timesteps vs diffusers'.
const TIMESTEP_TOL: f64 = 1e-3;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/e2e").join(name)
}

fn read_npy<T: ndarray_npy::ReadableElement>(path: &Path) -> ArrayD<T> {
    let file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/gen_e2e_reference.py)", path.display()));
    ArrayD::<T>::read_npy(std::io::BufReader::new(file)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read4(path: &Path) -> Array4<f32> {
    read_npy::<f32>(path).into_dimensionality::<Ix4>().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn meta() -> Value {
    let path = fixture("meta.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("meta.json parses")
}

fn case(name: &str) -> Value {
    meta()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in meta.json"))
        .clone()
}

/// max |got - want| / max(max |want|, 1e-3); infinite when `got` holds a non-finite value.
fn rel_err(got: &Array4<f32>, want: &Array4<f32>) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-3);
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| {
        if g.is_finite() {
            m.max((*g as f64 - *w as f64).abs() / scale)
        } else {
            f64::INFINITY
        }
    })
}

fn max_abs_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| if x.is_finite() { m.max((x - y).abs()) } else { f32::INFINITY })
}

// ---------------------------------------------------------------------------------------------
// The denoiser alone.

fn check_denoiser(model: &str, convolution: Convolution) {
    let card = ModelCard::load(root().join("models").join(format!("fmnist-{model}"))).expect("card loads");
    let mut d = Denoiser::load(&card, 1).expect("denoiser loads");
    d.set_convolution(convolution);
    d.prepare(1).expect("plan");
    let winograd = d.winograd_convolutions();
    eprintln!("{model} {convolution}: {winograd} convolutions as Winograd");
    match convolution {
        // 38 of the 62 convolutions are 3×3, stride 1, padding 1 (the rest: 1×1 and stride 2);
        // Other architectures keep im2col for all (`passes::winograd::pays_off`; on 32-bit ARM
        // a CPU without NEON, which qemu-arm's default CPU has).
        Convolution::Winograd => {
            let own = cfg!(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm"));
            let expected = if own { 38 } else { 0 };
            assert_eq!(winograd, expected, "{model}: convolutions rewritten to Winograd")
        }
        Convolution::Im2col => assert_eq!(winograd, 0, "{model}: Winograd with im2col asked"),
    }
    // Every GroupNorm of the UNet (2 per ResBlock, 1 per attention block, the output norm).
    assert_eq!(d.fused_group_norms(), 41, "{model}: GroupNorms fused");
    let sample = read4(&fixture("denoiser_sample.npy"));
    let timesteps: Array1<f32> = read_npy::<f32>(&fixture("denoiser_timestep.npy")).into_dimensionality().unwrap();
    let labels: Array1<i64> = read_npy::<i64>(&fixture("denoiser_class_labels.npy")).into_dimensionality().unwrap();
    let want = read4(&fixture(&format!("{model}_denoiser_out.npy")));
    let n = sample.shape()[0];
    assert!(n == 2 && timesteps.len() == n && labels.len() == n && want.shape() == sample.shape());
    assert!(
        labels.iter().any(|&l| Some(l) == card.classes.as_ref().unwrap().null),
        "the fixture covers the null class"
    );
    // predict() takes one timestep for the whole batch, and the fixture's timesteps differ per
    // image: one batch-1 call per image.
    for i in 0..n {
        let x = sample.slice(s![i..i + 1, .., .., ..]).to_owned();
        let mut out = Array4::<f32>::from_elem((1, 1, 32, 32), f32::NAN);
        d.predict(&x, timesteps[i] as f64, Some(&[labels[i]]), None, &mut out).expect("predict");
        let ref_i = want.slice(s![i..i + 1, .., .., ..]).to_owned();
        let err = max_abs_diff(&out, &ref_i);
        eprintln!("{model} denoiser image {i}: tract vs PyTorch max abs diff {err:.2e}");
        assert!(
            err <= DENOISER_ABS_TOL,
            "{model} image {i} (t = {}, label {}): tract vs PyTorch max abs diff {err:e} > {DENOISER_ABS_TOL:e}",
            timesteps[i],
            labels[i]
        );
    }
    // Batch 2 with one shared timestep: each image equals its batch-1 result.
    let t = timesteps[1] as f64;
    let mut pair = Array4::<f32>::zeros((2, 1, 32, 32));
    d.predict(&sample, t, Some(labels.as_slice().unwrap()), None, &mut pair).expect("predict batch 2");
    for i in 0..n {
        let mut one = Array4::<f32>::zeros((1, 1, 32, 32));
        d.predict(&sample.slice(s![i..i + 1, .., .., ..]).to_owned(), t, Some(&[labels[i]]), None, &mut one)
            .expect("predict");
        let err = max_abs_diff(&pair.slice(s![i..i + 1, .., .., ..]).to_owned(), &one);
        assert!(err <= 1e-5, "{model}: batch-2 image {i} differs from batch-1 by {err:e}");
    }
    // Without the source graph the plans built run as before (the same bits); a new plan is a
    // clear error, not a panic.
    let x = sample.slice(s![0..1, .., .., ..]).to_owned();
    let [mut before, mut after] = [Array4::<f32>::zeros((1, 1, 32, 32)), Array4::<f32>::zeros((1, 1, 32, 32))];
    d.predict(&x, t, Some(&[labels[0]]), None, &mut before).expect("predict");
    assert!(d.holds_graph());
    d.release_graph();
    assert!(!d.holds_graph());
    d.predict(&x, t, Some(&[labels[0]]), None, &mut after).expect("predict after release");
    assert!(before.iter().zip(&after).all(|(a, b)| a.to_bits() == b.to_bits()), "{model}: plan changed by release");
    let three = Array4::<f32>::zeros((3, 1, 32, 32));
    let mut out3 = Array4::<f32>::zeros((3, 1, 32, 32));
    match d.predict(&three, t, Some(&[0, 1, 2]), None, &mut out3) {
        Err(Error::Model { message, .. }) => {
            assert!(message.contains("batch 3") && message.contains("released"), "{message}")
        }
        other => panic!("{model}: batch 3 after release_graph: {other:?}"),
    }
    // A plan built from the source graph itself (freeing each kernel as it is replaced) is the
    // same plan.
    let mut last = Denoiser::load(&card, 1).expect("denoiser loads");
    last.set_convolution(convolution);
    last.prepare_final(1).expect("final plan");
    assert!(!last.holds_graph());
    let mut from_last = Array4::<f32>::zeros((1, 1, 32, 32));
    last.predict(&x, t, Some(&[labels[0]]), None, &mut from_last).expect("predict");
    assert!(
        before.iter().zip(&from_last).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{model}: prepare_final's plan differs"
    );
}

#[test]
fn teacher_denoiser_matches_pytorch() {
    check_denoiser("teacher", Convolution::Winograd);
}

#[test]
fn student_denoiser_matches_pytorch() {
    check_denoiser("student", Convolution::Winograd);
}

#[test]
fn teacher_denoiser_im2col_matches_pytorch() {
    check_denoiser("teacher", Convolution::Im2col);
}

#[test]
fn student_denoiser_im2col_matches_pytorch() {
    check_denoiser("student", Convolution::Im2col);
}

// ---------------------------------------------------------------------------------------------
// The pipeline against diffusers.

/// The case's card: the shipped one, with the case's [scheduler] overrides merged in.
fn case_card(c: &Value) -> ModelCard {
    let dir = root().join(c["model"].as_str().unwrap());
    let overrides = c["scheduler_overrides"].as_object().unwrap();
    if overrides.is_empty() {
        return ModelCard::load(&dir).expect("card loads");
    }
    let file = dir.join("model.toml");
    let mut table: toml::Table = std::fs::read_to_string(&file).unwrap().parse().expect("card is TOML");
    let sched = table.get_mut("scheduler").and_then(|v| v.as_table_mut()).expect("[scheduler]");
    for (k, v) in overrides {
        let v = match v {
            Value::String(s) => toml::Value::String(s.clone()),
            Value::Bool(b) => toml::Value::Boolean(*b),
            Value::Number(n) if n.is_i64() => toml::Value::Integer(n.as_i64().unwrap()),
            Value::Number(n) => toml::Value::Float(n.as_f64().unwrap()),
            other => panic!("override {k} = {other}: unsupported type"),
        };
        sched.insert(k.clone(), v);
    }
    ModelCard::parse(&toml::to_string(&table).unwrap(), &dir, &file).expect("overridden card parses")
}

fn load_pipeline(c: &Value, guidance_batching: GuidanceBatching) -> Pipeline {
    let opts = LoadOptions { threads: 1, guidance_batching, ..Default::default() };
    if c["scheduler_overrides"].as_object().unwrap().is_empty() {
        Pipeline::load(root().join(c["model"].as_str().unwrap()), opts).expect("pipeline loads")
    } else {
        let card = case_card(c);
        let onnx = std::fs::read(card.onnx_path()).unwrap();
        Pipeline::from_bytes(card, &onnx, opts).expect("pipeline loads")
    }
}

fn request(c: &Value) -> Request {
    Request {
        noise: Some(read4(&fixture("pipeline_noise.npy"))),
        init: c["init"].as_str().map(|f| read4(&fixture(f))),
        strength: c["strength"].as_f64(),
        classes: Some(c["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()),
        sampler: Some(c["sampler"].as_str().unwrap().parse().expect("sampler name")),
        steps: Some(c["steps"].as_u64().unwrap() as usize),
        guidance: Some(c["guidance"].as_f64().unwrap() as f32),
        ..Default::default()
    }
}

fn check_pipeline(name: &str, guidance_batching: GuidanceBatching) {
    let c = case(name);
    let want = read4(&fixture(&format!("{name}.npy")));
    let req = request(&c);

    // The schedule first, so a failure says whether the timesteps or the arithmetic differ.
    let card = case_card(&c);
    let kind: SamplerKind = req.sampler.unwrap();
    let steps = req.steps.unwrap();
    let sampler = match (req.strength, kind) {
        (Some(s), SamplerKind::Lcm) => Box::new(sampler::lcm::Lcm::with_strength(&card.scheduler, steps, s).unwrap()),
        _ => sampler::build(kind, &card.scheduler, steps, &SamplerOptions::default()).unwrap(),
    };
    let start = match (req.strength, kind) {
        (Some(s), k) if k != SamplerKind::Lcm => sampler::img2img_start(sampler.order(), steps, s).unwrap(),
        _ => 0,
    };
    let ts_want: Vec<f64> = c["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let ts = sampler.timesteps();
    assert!(
        ts.len() == ts_want.len() && ts.iter().zip(&ts_want).all(|(a, b)| (a - b).abs() <= TIMESTEP_TOL),
        "{name}: timesteps {ts:?} vs diffusers {ts_want:?}"
    );
    let sigma0 = c["init_noise_sigma"].as_f64().unwrap();
    assert!(
        (sampler.init_noise_sigma() - sigma0).abs() <= 1e-5 * sigma0,
        "{name}: init_noise_sigma {} vs diffusers {sigma0}",
        sampler.init_noise_sigma()
    );

    let mut pipe = load_pipeline(&c, guidance_batching);
    let mut calls = 0;
    let gen = pipe
        .generate(&req, &mut |_| {
            calls += 1;
            ControlFlow::Continue(())
        })
        .unwrap_or_else(|e| panic!("{name}: generate failed: {e}"));
    assert_eq!(calls, 2 * (ts_want.len() - start), "{name}: one callback per step run and image");
    assert_eq!(gen.sampler, kind);
    let err = rel_err(&gen.samples, &want);
    eprintln!("{name} ({guidance_batching:?}): relative error vs diffusers {err:.2e}");
    assert!(
        err <= PIPELINE_REL_TOL,
        "{name} ({guidance_batching:?}): relative error vs diffusers {err:.3e} > {PIPELINE_REL_TOL:e}; \
         first values {:?} vs {:?}",
        &gen.samples.as_slice().unwrap()[..4],
        &want.as_slice().unwrap()[..4]
    );
}

#[test]
fn teacher_ddim_img2img_matches_diffusers() {
    check_pipeline("teacher_ddim_img2img_s8_st05_g2", GuidanceBatching::TwoCalls);
}

#[test]
fn teacher_euler_img2img_matches_diffusers() {
    check_pipeline("teacher_euler_img2img_s6_st07_g2", GuidanceBatching::Concurrent);
}

#[test]
fn student_lcm_img2img_matches_diffusers() {
    check_pipeline("student_lcm_img2img_s1_st06", GuidanceBatching::TwoCalls);
}

#[test]
fn teacher_ddim_4_steps_guided_matches_diffusers() {
    check_pipeline("teacher_ddim_s4_g2", GuidanceBatching::TwoCalls);
}

#[test]
fn teacher_ddim_batched_guidance_matches_diffusers() {
    check_pipeline("teacher_ddim_s4_g2", GuidanceBatching::Batched);
}

#[test]
fn teacher_ddim_concurrent_guidance_matches_diffusers() {
    check_pipeline("teacher_ddim_s4_g2", GuidanceBatching::Concurrent);
}

/// Both guidance branches on their own thread (2 threads, one each) run the same single-thread
/// kernels as two calls in a row at 1 thread: the images must be bit-identical.
#[test]
fn concurrent_guidance_is_bit_identical_to_two_calls() {
    let c = case("teacher_ddim_s4_g2");
    let req = request(&c);
    let run = |threads, guidance_batching| {
        let opts = LoadOptions { threads, guidance_batching, ..Default::default() };
        let mut pipe = Pipeline::load(root().join(c["model"].as_str().unwrap()), opts).expect("pipeline loads");
        pipe.generate(&req, &mut |_| ControlFlow::Continue(())).expect("generates").samples
    };
    let serial = run(1, GuidanceBatching::TwoCalls);
    let concurrent = run(2, GuidanceBatching::Concurrent);
    let auto = run(2, GuidanceBatching::Auto);
    assert!(
        serial.iter().zip(&concurrent).all(|(a, b)| a.to_bits() == b.to_bits()),
        "concurrent differs from two calls"
    );
    assert!(
        serial.iter().zip(&auto).all(|(a, b)| a.to_bits() == b.to_bits()),
        "auto at 2 threads differs from two calls"
    );
}

#[test]
fn teacher_euler_6_steps_guided_matches_diffusers() {
    check_pipeline("teacher_euler_s6_g2", GuidanceBatching::TwoCalls);
}

#[test]
fn teacher_euler_fractional_timesteps_match_diffusers() {
    check_pipeline("teacher_euler_linspace_s6_g2", GuidanceBatching::TwoCalls);
}

#[test]
fn student_lcm_1_step_matches_diffusers() {
    check_pipeline("student_lcm_s1", GuidanceBatching::TwoCalls);
}

// ---------------------------------------------------------------------------------------------
// The command line.

fn cli(args: &[&str]) -> std::process::Output {
    let out = common::edge_diffuse().current_dir(root()).args(args).output().expect("the binary runs");
    assert!(
        out.status.success(),
        "edge-diffuse {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

#[test]
fn cli_ddim_with_noise_file_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let (png, npy) = (tmp.path().join("out.png"), tmp.path().join("out.npy"));
    let noise = fixture("pipeline_noise.npy");
    #[rustfmt::skip]
    let out = cli(&[
        "sample", "--model", "models/fmnist-teacher", "--noise", path_str(&noise),
        "--save-tensor", path_str(&npy), "--class", "3,7", "--sampler", "ddim", "--steps", "4",
        "--guidance", "2", "--threads", "1", "--quiet", "--out", path_str(&png),
    ]);
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "--quiet prints nothing");
    let got = read4(&npy);
    let want = read4(&fixture("teacher_ddim_s4_g2.npy"));
    let err = rel_err(&got, &want);
    eprintln!("CLI ddim: relative error vs diffusers {err:.2e}");
    assert!(err <= PIPELINE_REL_TOL, "CLI ddim: relative error vs diffusers {err:.3e} > {PIPELINE_REL_TOL:e}");

    // A grid of 2 images, 32x32 each, one pixel apart, in grey; pixels are the saved tensor's.
    let img = image::open(&png).expect("a readable PNG").into_luma8();
    assert_eq!(img.dimensions(), (2 * 32 + 1, 32));
    for i in 0..2 {
        for y in 0..32 {
            for x in 0..32 {
                let v = got[[i, 0, y, x]];
                let want = edge_diffuse::files::to_u8(v, [-1.0, 1.0]);
                assert_eq!(img.get_pixel((i * 33 + x) as u32, y as u32).0[0], want, "pixel ({i}, {y}, {x})");
            }
        }
    }
}

#[test]
fn cli_is_deterministic_in_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| -> Vec<u8> {
        let p = tmp.path().join(name);
        #[rustfmt::skip]
        cli(&["sample", "--model", "models/fmnist-student", "--seed", seed, "--threads", "1", "--quiet", "--out", path_str(&p)]);
        std::fs::read(&p).unwrap()
    };
    let a = run("11", "a.png");
    let b = run("11", "b.png");
    let c = run("12", "c.png");
    assert!(a == b, "the same seed gave different PNGs");
    assert!(a != c, "seeds 11 and 12 gave the same PNG");
    let img = image::load_from_memory(&a).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
}

#[test]
fn cli_num_images_gives_distinct_images() {
    let tmp = tempfile::tempdir().unwrap();
    let (png, npy) = (tmp.path().join("two.png"), tmp.path().join("two.npy"));
    #[rustfmt::skip]
    cli(&[
        "sample", "--model", "models/fmnist-student", "--seed", "3", "--num-images", "2", "--class", "5",
        "--threads", "1", "--quiet", "--save-tensor", path_str(&npy), "--out", path_str(&png),
    ]);
    let x = read4(&npy);
    assert_eq!(x.shape(), &[2, 1, 32, 32]);
    assert!(x.iter().all(|v| v.is_finite()));
    let (a, b) = (x.slice(s![0, .., .., ..]), x.slice(s![1, .., .., ..]));
    let diff = a.iter().zip(b.iter()).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(diff > 0.1, "the two images are (nearly) the same: max diff {diff}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (65, 32));
}

#[test]
fn cli_img2img_with_init_and_noise_files_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let (png, npy) = (tmp.path().join("out.png"), tmp.path().join("out.npy"));
    let (noise, init) = (fixture("pipeline_noise.npy"), fixture("img2img_init.npy"));
    #[rustfmt::skip]
    cli(&[
        "sample", "--model", "models/fmnist-teacher", "--noise", path_str(&noise), "--init", path_str(&init),
        "--strength", "0.5", "--save-tensor", path_str(&npy), "--class", "3,7", "--sampler", "ddim",
        "--steps", "8", "--guidance", "2", "--threads", "1", "--quiet", "--out", path_str(&png),
    ]);
    let err = rel_err(&read4(&npy), &read4(&fixture("teacher_ddim_img2img_s8_st05_g2.npy")));
    assert!(err <= PIPELINE_REL_TOL, "CLI img2img: relative error vs diffusers {err:.3e} > {PIPELINE_REL_TOL:e}");

    // A PNG init: the image written above, read back through the card's value range, starts a
    // run that stays near it at a low strength and moves away at a high one.
    let start = image::open(&png).unwrap().into_luma8();
    let first = tmp.path().join("first.png");
    image::imageops::crop_imm(&start, 0, 0, 32, 32).to_image().save(&first).unwrap();
    let distance = |strength: &str| -> f64 {
        let out = tmp.path().join(format!("s{strength}.png"));
        #[rustfmt::skip]
        cli(&[
            "sample", "--model", "models/fmnist-teacher", "--init", path_str(&first), "--strength", strength,
            "--class", "3", "--sampler", "ddim", "--steps", "10", "--guidance", "2", "--threads", "1",
            "--quiet", "--out", path_str(&out),
        ]);
        let (a, b) = (image::open(&out).unwrap().into_luma8(), image::open(&first).unwrap().into_luma8());
        a.pixels().zip(b.pixels()).map(|(p, q)| (p.0[0] as f64 - q.0[0] as f64).abs()).sum::<f64>() / 1024.0
    };
    let (near, far) = (distance("0.2"), distance("1.0"));
    assert!(near < far / 2.0, "strength 0.2 moved the image by {near} on average, strength 1 by {far}");
}

#[test]
fn cli_trajectory_strip_ends_in_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let (png, strip) = (tmp.path().join("out.png"), tmp.path().join("strip.png"));
    #[rustfmt::skip]
    cli(&[
        "sample", "--model", "models/fmnist-student", "--num-images", "2", "--steps", "3", "--threads", "1",
        "--separate", "--trajectory", path_str(&strip), "--quiet", "--out", path_str(&png),
    ]);
    // Two rows of 3 predictions and the result, 32×32 each with one pixel between.
    let strip = image::open(&strip).unwrap().into_luma8();
    assert_eq!(strip.dimensions(), (4 * 33 - 1, 2 * 33 - 1));
    let cell = |row: u32, col: u32| image::imageops::crop_imm(&strip, col * 33, row * 33, 32, 32).to_image();
    for row in 0..2 {
        let result = image::open(tmp.path().join(format!("out-{row}.png"))).unwrap().into_luma8();
        assert_eq!(cell(row, 3), result, "row {row}: the last column is the image written");
        // LCM's last step lands on its prediction, so the last prediction is the result.
        assert_eq!(cell(row, 2), result, "row {row}: the last prediction");
        assert_ne!(cell(row, 0), result, "row {row}: the first prediction is rougher");
    }
}

#[test]
fn cli_inpainting_keeps_the_unmasked_part_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, mask, out) = (tmp.path().join("first.png"), tmp.path().join("mask.png"), tmp.path().join("out.png"));
    cli(&["sample", "--model", "models/fmnist-student", "--class", "7", "--quiet", "--out", path_str(&first)]);
    // Regenerate the left half.
    let m = image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 255 } else { 0 }]));
    m.save(&mask).unwrap();
    #[rustfmt::skip]
    cli(&[
        "sample", "--model", "models/fmnist-student", "--class", "1", "--seed", "9", "--init", path_str(&first),
        "--mask", path_str(&mask), "--steps", "3", "--quiet", "--out", path_str(&out),
    ]);
    let (a, b) = (image::open(&first).unwrap().into_luma8(), image::open(&out).unwrap().into_luma8());
    let (mut kept, mut changed) = (0, 0);
    for (x, y, p) in b.enumerate_pixels() {
        if x >= 16 {
            assert_eq!(p, a.get_pixel(x, y), "pixel ({x}, {y}) outside the mask changed");
            kept += 1;
        } else {
            changed += (p != a.get_pixel(x, y)) as usize;
        }
    }
    assert_eq!(kept, 512);
    assert!(changed > 100, "only {changed} of 512 pixels inside the mask were redrawn");
}

/// `sample` through the library with the student at `size` pixels, tiled or run whole.
fn student_canvas(size: [usize; 2], tile_overlap: Option<usize>, seed: u64) -> Array4<f32> {
    let opts = LoadOptions { threads: 1, size: Some(size), tile_overlap, ..Default::default() };
    let mut pipe = Pipeline::load(root().join("models/fmnist-student"), opts).unwrap();
    let req = Request { seed, classes: Some(vec![7]), steps: Some(2), ..Default::default() };
    pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap().samples
}

#[test]
fn multidiffusion_over_the_model_size_is_the_plain_run() {
    // One window covers the canvas: the blend is the window itself.
    assert_eq!(student_canvas([32, 32], Some(8), 4), student_canvas([32, 32], None, 4));
}

#[test]
fn multidiffusion_draws_a_larger_canvas_deterministically() {
    let a = student_canvas([64, 48], Some(8), 4);
    assert_eq!(a.shape(), [1, 1, 48, 64]);
    assert!(a.iter().all(|v| v.is_finite() && v.abs() < 4.0));
    assert_eq!(a, student_canvas([64, 48], Some(8), 4), "same seed, same canvas");
    assert_ne!(a, student_canvas([64, 48], Some(8), 5));
    // The student's graph is fixed at 32×32: only windows can draw a larger canvas.
    let opts = LoadOptions { threads: 1, size: Some([64, 48]), ..Default::default() };
    let err = Pipeline::load(root().join("models/fmnist-student"), opts).err().unwrap().to_string();
    assert!(err.contains("image.height is 48"), "{err}");
    // The canvas is not one window repeated: its halves differ.
    let (left, right) = (a.slice(ndarray::s![0, 0, .., ..32]), a.slice(ndarray::s![0, 0, .., 32..]));
    assert_ne!(left, right);
}

#[test]
fn multidiffusion_refuses_a_canvas_smaller_than_the_model() {
    let opts = LoadOptions { threads: 1, size: Some([16, 64]), tile_overlap: Some(8), ..Default::default() };
    let err = Pipeline::load(root().join("models/fmnist-student"), opts).err().unwrap().to_string();
    assert!(err.starts_with("tile-overlap:") && err.contains("at least the model's size"), "{err}");
    let opts = LoadOptions { threads: 1, size: Some([64, 64]), tile_overlap: Some(32), ..Default::default() };
    let err = Pipeline::load(root().join("models/fmnist-student"), opts).err().unwrap().to_string();
    assert!(err.starts_with("tile-overlap:") && err.contains("less than"), "{err}");
}

#[test]
fn cli_resize_init_takes_an_image_of_another_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (init, out) = (tmp.path().join("big.png"), tmp.path().join("out.png"));
    image::GrayImage::from_fn(100, 60, |x, y| image::Luma([((x * 2 + y) % 256) as u8])).save(&init).unwrap();
    #[rustfmt::skip]
    cli(&[
        "sample", "--model", "models/fmnist-student", "--init", path_str(&init), "--resize-init",
        "--strength", "0.5", "--quiet", "--out", path_str(&out),
    ]);
    assert_eq!(image::open(&out).unwrap().into_luma8().dimensions(), (32, 32));
}
