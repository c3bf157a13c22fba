//! σ-conditioned denoisers D(x; σ) (k-diffusion's convention) and conditioning inputs.
//!
//! * Sampler parity with k-diffusion: each file in `tests/fixtures/sigma/samplers/` (written by
//!   `tools/gen_sigma_reference.py`) records one run of `sample_euler`, `sample_euler_ancestral`,
//!   `sample_heun` or `sample_dpmpp_2m` on Karras sigmas with a closed-form test denoiser; the
//!   same run goes through `sampler::build_for_sigma_model` here, replaying the noise draws.
//! * Pipeline parity: `tests/fixtures/sigma/model/` holds a tiny D(x; σ, difficulty) with EDM's
//!   preconditioning in the graph, the card of issue 22, and whole runs through onnxruntime with
//!   k-diffusion's samplers and diffusers' `CMStochasticIterativeScheduler`.
//! * The CLI: `--cond`, `info`, `bench`, and the bad-input cases.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use edge_diffuse::card::SchedulerConfig;
use edge_diffuse::sampler::{build_for_sigma_model, NoiseSource, SamplerKind, SamplerOptions};
use edge_diffuse::{LoadOptions, Pipeline, Request};
use ndarray::{Array4, ArrayD};
use serde::Deserialize;

const TOLERANCE: f64 = 1e-4;
const SIGMA_DATA: f32 = 0.5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sigma")
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| v.abs() as f64).fold(1e-3, f64::max);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplerFixture {
    sampler: String,
    steps: usize,
    config: serde_json::Value,
    shape: [usize; 4],
    noise: Vec<f32>,
    sigmas: Vec<f32>,
    step_noises: Vec<Vec<f32>>,
    #[serde(rename = "final")]
    final_sample: Vec<f32>,
}

/// The generator's test denoiser, x̂₀ = c·x + (1 − c)·tanh(x)/2 with c = σ_d²/(σ² + σ_d²).
fn test_denoiser(x: f32, sigma: f32) -> f32 {
    let c = SIGMA_DATA * SIGMA_DATA / (sigma * sigma + SIGMA_DATA * SIGMA_DATA);
    c * x + (1.0 - c) * x.tanh() * 0.5
}

struct Replay(VecDeque<Vec<f32>>);

impl NoiseSource for Replay {
    fn fill(&mut self, out: &mut Array4<f32>) {
        let draw = self.0.pop_front().expect("the sampler drew more noise than k-diffusion");
        out.as_slice_mut().unwrap().copy_from_slice(&draw);
    }
}

#[test]
fn samplers_match_k_diffusion_on_karras_sigmas() {
    let dir = fixtures().join("samplers");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    let mut seen = BTreeMap::<String, usize>::new();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let fx: SamplerFixture = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let kind: SamplerKind = fx.sampler.parse().unwrap();
        let cfg: SchedulerConfig = serde_json::from_value(fx.config.clone()).unwrap();
        let eps = cfg.prediction_type == Some(edge_diffuse::PredictionType::Epsilon);
        let mut s = build_for_sigma_model(kind, &cfg, fx.steps, &SamplerOptions::default()).unwrap();
        assert!((s.init_noise_sigma() - fx.sigmas[0] as f64).abs() <= 1e-6 * fx.sigmas[0] as f64, "{name}");
        // Every model call is at one of k-diffusion's sigmas.
        for t in s.timesteps() {
            assert!(fx.sigmas.iter().any(|&k| (*t - k as f64).abs() <= 1e-5 * k as f64), "{name}: σ {t}");
        }
        let mut x = Array4::from_shape_vec(fx.shape, fx.noise.clone()).unwrap();
        let sigma0 = s.init_noise_sigma() as f32;
        x.mapv_inplace(|v| v * sigma0);
        let mut noise = Replay(fx.step_noises.iter().cloned().collect());
        let mut out = Array4::<f32>::zeros(fx.shape);
        for k in 0..s.timesteps().len() {
            let sigma = s.timesteps()[k] as f32;
            ndarray::Zip::from(&mut out).and(&x).for_each(|o, &x| {
                let d = test_denoiser(x, sigma);
                *o = if eps { (x - d) / sigma } else { d };
            });
            s.step(&out, k, &mut x, &mut noise);
        }
        assert!(noise.0.is_empty(), "{name}: {} of k-diffusion's noise draws unused", noise.0.len());
        let err = rel_err(x.as_slice().unwrap(), &fx.final_sample);
        assert!(err <= TOLERANCE, "{name}: relative error {err:e}");
        *seen.entry(fx.sampler).or_default() += 1;
    }
    for kind in ["euler", "euler_ancestral", "heun", "dpmpp_2m"] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 2, "fewer than 2 fixtures for {kind}: {seen:?}");
    }
}

#[test]
fn samplers_on_a_timestep_schedule_cannot_drive_a_sigma_model() {
    for kind in [SamplerKind::Ddim, SamplerKind::Ddpm, SamplerKind::Lcm] {
        let err = build_for_sigma_model(kind, &SchedulerConfig::default(), 2, &SamplerOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(kind.name()) && err.contains("σ-conditioned"), "{err}");
    }
}

#[derive(Deserialize)]
struct Case {
    name: String,
    sampler: String,
    steps: usize,
    difficulty: Vec<f32>,
    scheduler: String,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("model/cases.json")).unwrap()).unwrap()
}

/// The test model's folder with its card, `[scheduler]` lines added and `edit` applied.
fn model_dir(extra_scheduler: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let src = fixtures().join("model");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("denoiser.onnx"), dir.path().join("denoiser.onnx")).unwrap();
    let card = std::fs::read_to_string(src.join("model.toml")).unwrap();
    let card = card.replace("[defaults]", &format!("{extra_scheduler}[defaults]"));
    std::fs::write(dir.path().join("model.toml"), edit(card)).unwrap();
    dir
}

fn read_npy(path: &Path) -> Array4<f32> {
    edge_diffuse::files::read_npy4(path).unwrap()
}

#[test]
fn pipeline_runs_a_sigma_model_as_k_diffusion_and_diffusers_do() {
    let noise = read_npy(&fixtures().join("model/noise.npy"));
    for case in cases() {
        let dir = model_dir(&case.scheduler, |c| c);
        let mut pipe = Pipeline::load(dir.path(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
        let mut conditioning = BTreeMap::new();
        conditioning.insert(
            "difficulty".to_string(),
            ArrayD::from_shape_vec(vec![case.difficulty.len()], case.difficulty.clone()).unwrap(),
        );
        let req = Request {
            noise: Some(noise.clone()),
            sampler: Some(case.sampler.parse().unwrap()),
            steps: Some(case.steps),
            conditioning,
            ..Default::default()
        };
        let got = pipe.generate(&req, &mut |_| std::ops::ControlFlow::Continue(())).unwrap().samples;
        let want = read_npy(&fixtures().join(format!("model/{}.npy", case.name)));
        let err = rel_err(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(err <= TOLERANCE, "{}: relative error {err:e}", case.name);
    }
}

#[derive(Deserialize)]
struct InitCase {
    name: String,
    sampler: String,
    steps: usize,
    difficulty: Vec<f32>,
    init_sigma: f64,
}

/// Image-to-image from a given σ: `init + σ·noise`, then the steps down from σ, as k-diffusion's
/// samplers on Karras sigmas from σ and diffusers' consistency loop with `sigma_max = σ` run it.
#[test]
fn init_sigma_starts_at_that_sigma_as_k_diffusion_and_diffusers_do() {
    let noise = read_npy(&fixtures().join("model/noise.npy"));
    let init = read_npy(&fixtures().join("model/init.npy"));
    let cases: Vec<InitCase> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("model/init_cases.json")).unwrap()).unwrap();
    assert!(cases.iter().any(|c| c.sampler == "consistency" && c.steps == 1));
    let dir = model_dir("", |c| c);
    let mut pipe = Pipeline::load(dir.path(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    for case in cases {
        let want = read_npy(&fixtures().join(format!("model/{}.npy", case.name)));
        let mut run = |sigma: f64| {
            let mut calls = Vec::new();
            let req = Request {
                noise: Some(noise.clone()),
                init: Some(init.clone()),
                init_sigma: Some(sigma),
                sampler: Some(case.sampler.parse().unwrap()),
                steps: Some(case.steps),
                conditioning: [(
                    "difficulty".to_string(),
                    ArrayD::from_shape_vec(vec![case.difficulty.len()], case.difficulty.clone()).unwrap(),
                )]
                .into(),
                ..Default::default()
            };
            let got = pipe
                .generate(&req, &mut |s| {
                    calls.push(s.step);
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap()
                .samples;
            (rel_err(got.as_slice().unwrap(), want.as_slice().unwrap()), calls.len())
        };
        let (err, calls) = run(case.init_sigma);
        assert!(err <= TOLERANCE, "{}: relative error {err:e}", case.name);
        let per_image = if case.sampler == "heun" { 2 * case.steps - 1 } else { case.steps };
        assert_eq!(calls, 2 * per_image, "{}: every step from σ runs", case.name);
        // Started at another σ, the same run misses.
        let (off, _) = run(case.init_sigma * 1.25);
        assert!(off > 10.0 * TOLERANCE, "{}: σ × 1.25 is still within {off:e}", case.name);
    }
    // Outside the card's σ range, or on a sampler that steps on timesteps: refused by name.
    for (sampler, sigma, want) in
        [("euler", 81.0, "above"), ("euler", 0.001, "below"), ("euler", 0.0, "> 0"), ("heun", f64::NAN, "> 0")]
    {
        let req = Request {
            init: Some(init.clone()),
            init_sigma: Some(sigma),
            sampler: Some(sampler.parse().unwrap()),
            ..Default::default()
        };
        let err = pipe.generate(&req, &mut |_| std::ops::ControlFlow::Continue(())).unwrap_err().to_string();
        assert!(err.contains("init-sigma") && err.contains(want), "σ {sigma}: {err}");
    }
}

/// MultiDiffusion with a 1-step consistency model: one call per window at σ_max, blended.
#[test]
fn a_one_step_consistency_model_draws_a_larger_canvas_in_windows() {
    let dir = model_dir("", |c| c);
    let draw = |size: [usize; 2], seed: u64| {
        let opts = LoadOptions { threads: 1, size: Some(size), tile_overlap: Some(4), ..Default::default() };
        let mut pipe = Pipeline::load(dir.path(), opts).unwrap();
        let mut calls = 0;
        let req = Request { seed, steps: Some(1), ..Default::default() };
        let out = pipe
            .generate(&req, &mut |_| {
                calls += 1;
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!((out.sampler.name(), calls), ("consistency", 1));
        out.samples
    };
    let a = draw([20, 12], 3);
    assert_eq!(a.shape(), [1, 1, 12, 20]);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, draw([20, 12], 3), "same seed, same canvas");
    assert_ne!(a, draw([20, 12], 4));
    // One window over the model's own size is the plain run.
    let plain = {
        let mut pipe = Pipeline::load(dir.path(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
        let req = Request { seed: 3, steps: Some(1), ..Default::default() };
        pipe.generate(&req, &mut |_| std::ops::ControlFlow::Continue(())).unwrap().samples
    };
    assert_eq!(draw([8, 8], 3), plain);
}

#[test]
fn conditioning_takes_the_card_default_and_changes_the_image() {
    let noise = read_npy(&fixtures().join("model/noise.npy"));
    let dir = model_dir("", |c| c);
    let mut pipe = Pipeline::load(dir.path(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let run = |pipe: &mut Pipeline, values: Option<Vec<f32>>| {
        let mut conditioning = BTreeMap::new();
        if let Some(v) = values {
            conditioning.insert("difficulty".to_string(), ArrayD::from_shape_vec(vec![v.len()], v).unwrap());
        }
        let req = Request { noise: Some(noise.clone()), conditioning, ..Default::default() };
        pipe.generate(&req, &mut |_| std::ops::ControlFlow::Continue(())).unwrap().samples
    };
    let default = run(&mut pipe, None);
    assert_eq!(default, run(&mut pipe, Some(vec![0.5])), "the card's default is 0.5");
    assert_ne!(default, run(&mut pipe, Some(vec![0.9])));
    // Guided: conditional 0.9 against the card's null 0.0.
    let req = Request {
        noise: Some(noise.clone()),
        guidance: Some(2.0),
        conditioning: [("difficulty".to_string(), ArrayD::from_elem(vec![1], 0.9f32))].into(),
        ..Default::default()
    };
    let guided = pipe.generate(&req, &mut |_| std::ops::ControlFlow::Continue(())).unwrap().samples;
    assert_ne!(guided, run(&mut pipe, Some(vec![0.9])));
}

fn sample(dir: &Path, extra: &[&str]) -> std::process::Output {
    common::edge_diffuse()
        .args(["sample", "--quiet", "--threads", "1", "--model"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn cli_runs_the_card_of_the_issue_with_cond_and_noise() {
    let dir = model_dir("", |c| c);
    let out_dir = tempfile::tempdir().unwrap();
    let tensor = out_dir.path().join("out.npy");
    let noise = fixtures().join("model/noise.npy");
    let png = out_dir.path().join("x.png");
    let out = sample(
        dir.path(),
        &[
            "--cond",
            "difficulty=0.25,0.9",
            "--noise",
            noise.to_str().unwrap(),
            "--save-tensor",
            tensor.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = read_npy(&fixtures().join("model/consistency_s1.npy"));
    let err = rel_err(read_npy(&tensor).as_slice().unwrap(), want.as_slice().unwrap());
    assert!(err <= TOLERANCE, "relative error {err:e}");

    // The same values from a file.
    let values = out_dir.path().join("d.npy");
    ndarray_npy::write_npy(&values, &ndarray::arr1(&[0.25f32, 0.9])).unwrap();
    let tensor2 = out_dir.path().join("out2.npy");
    let cond = format!("difficulty=@{}", values.display());
    let out = sample(
        dir.path(),
        &[
            "--cond",
            &cond,
            "--noise",
            noise.to_str().unwrap(),
            "--save-tensor",
            tensor2.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_npy(&tensor), read_npy(&tensor2));

    let info = common::edge_diffuse().args(["info", "--model"]).arg(dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success() && text.contains("sigma") && text.contains("conditioning difficulty"), "{text}");

    let bench = common::edge_diffuse()
        .args(["bench", "--threads", "1", "--runs", "2", "--json", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
    let v: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!(v["sampler"], "consistency");
}

/// One `error:` line naming `want`, exit 1, and nothing written.
fn assert_refused(out: &std::process::Output, want: &[&str], written: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.lines().count() == 1, "{err}");
    for w in want {
        assert!(err.contains(w), "{err:?} should name {w:?}");
    }
    assert!(!written.exists(), "{} was written", written.display());
}

#[test]
fn bad_sigma_and_conditioning_input_is_one_error_line() {
    let dir = model_dir("", |c| c);
    let out_dir = tempfile::tempdir().unwrap();
    let png = out_dir.path().join("x.png");
    let p = png.to_str().unwrap();
    let wrong = out_dir.path().join("wrong.npy");
    ndarray_npy::write_npy(&wrong, &ndarray::Array2::<f32>::zeros((2, 3))).unwrap();
    let wrong_cond = format!("difficulty=@{}", wrong.display());
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--sampler", "ddim"], vec!["ddim", "σ-conditioned", "euler"]),
        (vec!["--sampler", "lcm"], vec!["lcm", "σ-conditioned"]),
        (vec!["--cond", "hardness=0.3"], vec!["--cond", "hardness", "difficulty"]),
        (vec!["--cond", "difficulty=0.3,abc"], vec!["--cond difficulty", "\"abc\" is not a number"]),
        (vec!["--cond", "difficulty=nan"], vec!["--cond difficulty", "not a finite number"]),
        (vec!["--cond", "difficulty"], vec!["--cond", "NAME=V"]),
        (vec!["--cond", "difficulty=1", "--cond", "difficulty=2"], vec!["difficulty", "twice"]),
        (vec!["--cond", &wrong_cond], vec!["--cond difficulty", "[2, 3]"]),
    ];
    for (args, want) in cases {
        let mut all = args.clone();
        all.extend(["--out", p]);
        assert_refused(&sample(dir.path(), &all), &want, &png);
    }

    // A card default of the wrong shape: a file of [2, 3] for a per-image number.
    std::fs::copy(&wrong, dir.path().join("d.npy")).unwrap();
    let bad_default = model_dir("", |c| c.replace("default = 0.5", "default = \"d.npy\""));
    std::fs::copy(&wrong, bad_default.path().join("d.npy")).unwrap();
    assert_refused(
        &sample(bad_default.path(), &["--out", p]),
        &["model.toml", "model.conditioning.difficulty.default", "[2, 3]"],
        &png,
    );

    // A graph input that nothing binds: named, with the card lines to add.
    let unbound = model_dir("", |c| {
        c.replace("[model.conditioning.difficulty]", "[unused]").replace("default = 0.5\nnull = 0.0\n", "")
    });
    let card = std::fs::read_to_string(unbound.path().join("model.toml"))
        .unwrap()
        .replace("[unused]   # a further graph input: one float32 per image\n", "");
    std::fs::write(unbound.path().join("model.toml"), card).unwrap();
    assert_refused(
        &sample(unbound.path(), &["--out", p]),
        &["\"difficulty\"", "[model.conditioning.difficulty]", "default"],
        &png,
    );

    // Guidance with an input that has no null.
    let no_null = model_dir("", |c| c.replace("null = 0.0\n", ""));
    assert_refused(
        &sample(no_null.path(), &["--out", p, "--guidance", "2"]),
        &["guidance", "difficulty", "null"],
        &png,
    );
}

/// Issue 22's card, exactly as written.
const ISSUE_CARD: &str = r#"[model]
name = "edm-consistency"
onnx = "denoiser.onnx"
[model.inputs]
sample = "noisy"
sigma = "sigma"
[model.conditioning.difficulty]   # a further graph input: one float32 per image
default = 0.5
[image]
channels = 1
height = 128
width = 128
[scheduler]
sigma_min = 0.002
sigma_max = 80.0
sigma_data = 0.5
prediction_type = "sample"
[defaults]
sampler = "consistency"
steps = 1
"#;

#[test]
fn the_issue_card_runs_the_corpus_consistency_model_in_one_step_and_several() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus/consistency_edm");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(corpus.join("model.onnx"), dir.path().join("denoiser.onnx")).unwrap();
    std::fs::write(dir.path().join("model.toml"), ISSUE_CARD).unwrap();
    let noise = Array4::from_shape_fn((2, 1, 128, 128), |(b, _, y, x)| {
        ((b * 7919 + y * 131 + x * 17) % 23) as f32 / 11.5 - 1.0
    });
    let noise_path = dir.path().join("N.npy");
    ndarray_npy::write_npy(&noise_path, &noise).unwrap();
    let run = |steps: &str, out: &str| {
        let tensor = dir.path().join(out);
        let o = sample(
            dir.path(),
            &[
                "--cond",
                "difficulty=0.25,0.9",
                "--noise",
                noise_path.to_str().unwrap(),
                "--save-tensor",
                tensor.to_str().unwrap(),
                "--steps",
                steps,
                "--out",
                dir.path().join("x.png").to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_npy(&tensor)
    };
    let one = run("1", "one.npy");
    // One step is one call of D at σ_max, clamped to [-1, 1] (clip_denoised).
    let card = edge_diffuse::ModelCard::load(dir.path()).unwrap();
    let mut d = edge_diffuse::runtime::Denoiser::load(&card, 1).unwrap();
    for (i, difficulty) in [0.25f32, 0.9].into_iter().enumerate() {
        let x = noise.slice(ndarray::s![i..i + 1, .., .., ..]).mapv(|v| v * 80.0);
        let extra = [ArrayD::from_elem(vec![1], difficulty)];
        let cond = edge_diffuse::runtime::Conditions { extra: &extra, ..Default::default() };
        let mut out = Array4::zeros(x.raw_dim());
        d.predict_with(&x, 80.0, &cond, &mut out).unwrap();
        out.mapv_inplace(|v| v.clamp(-1.0, 1.0));
        let got = one.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
        let err = rel_err(got.as_slice().unwrap(), out.as_slice().unwrap());
        assert!(err <= 1e-6, "image {i}: {err:e}");
    }
    let three = run("3", "three.npy");
    // The clamped x̂₀ plus noise at σ_min, as diffusers adds it after the last step too.
    assert!(three.iter().all(|v| v.is_finite() && v.abs() <= 1.0 + 0.002 * 6.0));
    assert_ne!(one, three);
    let bench = common::edge_diffuse()
        .args(["bench", "--threads", "1", "--runs", "1", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
}
