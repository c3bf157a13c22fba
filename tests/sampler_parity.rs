//! Parity of the Rust samplers with diffusers' schedulers.
//!
//! Each file in `tests/fixtures/samplers/` (written by `tools/gen_reference.py`) records one run
//! of diffusers' standard sampling loop with a dummy model, `out = x_in · t / (t + 1)`: the
//! starting noise, the timesteps, every noise draw the scheduler made inside `step`, and the
//! sample after every step. Here the same loop runs through `edge_diffuse::sampler`, replaying
//! the recorded draws, and every step must match diffusers to a relative error of 1e-4.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use edge_diffuse::card::SchedulerConfig;
use edge_diffuse::sampler::lcm::Lcm;
use edge_diffuse::sampler::{
    build, build_from_sigma, img2img_start, NoiseSource, Sampler, SamplerKind, SamplerOptions,
};
use ndarray::Array4;
use serde::Deserialize;

/// max_i |rust_i - ref_i| / max(max_i |ref_i|, ERR_FLOOR) must not exceed this.
const TOLERANCE: f64 = 1e-4;
const ERR_FLOOR: f64 = 1e-3;
/// Timesteps must agree to this, absolutely.
const TIMESTEP_TOL: f64 = 1e-3;
/// init_noise_sigma must agree to this, relatively.
const SIGMA_TOL: f64 = 1e-5;
/// Every sampler needs at least this many fixtures.
const MIN_FIXTURES: usize = 2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    sampler: String,
    steps: usize,
    eta: f32,
    config: serde_json::Value,
    shape: [usize; 4],
    noise: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    step_noises: Vec<Vec<f32>>,
    trajectory: Vec<Vec<f32>>,
    #[serde(rename = "final")]
    final_sample: Vec<f32>,
    /// An image-to-image run: the schedule starts at `start`, from `init` noised by `noise`.
    #[serde(default)]
    img2img: Option<Img2Img>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Img2Img {
    /// diffusers' truncated schedule at this strength, or (`init_sigma`) the Karras schedule
    /// from this σ.
    #[serde(default)]
    strength: Option<f64>,
    #[serde(default)]
    init_sigma: Option<f64>,
    start: usize,
    init: Vec<f32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("samplers")
}

/// All fixtures, sorted by file name, as (file name, parsed fixture).
fn load_all() -> Vec<(String, Fixture)> {
    let dir = fixture_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}; run tools/gen_reference.py", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            let fx: Fixture = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: bad fixture: {e}"));
            (name, fx)
        })
        .collect()
}

fn load_sampler(kind: SamplerKind) -> Vec<(String, Fixture)> {
    load_all().into_iter().filter(|(_, fx)| fx.sampler == kind.name()).collect()
}

fn scheduler_config(fx: &Fixture) -> Result<SchedulerConfig, String> {
    serde_json::from_value(fx.config.clone()).map_err(|e| format!("config does not parse as SchedulerConfig: {e}"))
}

/// Replays recorded noise draws in order; asking for more than were recorded is an error.
struct Replay {
    draws: VecDeque<Vec<f32>>,
    recorded: usize,
    /// The first misuse, if any: the sampler asked for a draw that does not exist, or of the wrong size.
    error: Option<String>,
}

impl Replay {
    fn new(draws: &[Vec<f32>]) -> Self {
        Replay { draws: draws.iter().cloned().collect(), recorded: draws.len(), error: None }
    }

    fn used(&self) -> usize {
        self.recorded - self.draws.len()
    }
}

impl NoiseSource for Replay {
    fn fill(&mut self, out: &mut Array4<f32>) {
        let Some(draw) = self.draws.pop_front() else {
            if self.error.is_none() {
                self.error = Some(format!(
                    "the sampler asked for noise draw #{} but diffusers drew only {}",
                    self.recorded + 1,
                    self.recorded
                ));
            }
            out.fill(f32::NAN);
            return;
        };
        if draw.len() != out.len() {
            if self.error.is_none() {
                self.error = Some(format!(
                    "noise draw #{} has {} values, the sampler asked for {} (shape {:?})",
                    self.used(),
                    draw.len(),
                    out.len(),
                    out.shape()
                ));
            }
            out.fill(f32::NAN);
            return;
        }
        // Logical (row-major) order, the order torch flattens in.
        for (o, v) in out.iter_mut().zip(draw) {
            *o = v;
        }
    }
}

/// max_i |a_i - b_i| / max(max_i |b_i|, ERR_FLOOR), with the worst index; infinite when `a`
/// holds a non-finite value.
fn rel_err(a: &[f32], b: &[f32]) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs())).max(ERR_FLOOR);
    let mut worst = (0.0f64, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = if x.is_finite() { (*x as f64 - *y as f64).abs() / scale } else { f64::INFINITY };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    worst
}

fn mismatch(what: &str, got: &[f32], want: &[f32]) -> Option<String> {
    let (err, i) = rel_err(got, want);
    (err > TOLERANCE).then(|| {
        let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        format!(
            "{what}: rel err {err:.3e} > {TOLERANCE:e}; worst element {i}: rust {} vs diffusers {} (max|ref| {max_ref}); \
             first values rust {:?} vs diffusers {:?}",
            got[i],
            want[i],
            &got[..got.len().min(4)],
            &want[..want.len().min(4)],
        )
    })
}

/// The dummy model of diffusers' tests: out = x_in · t / (t + 1), in float32.
fn dummy_model(x_in: &Array4<f32>, t: f64) -> Array4<f32> {
    let t = t as f32;
    x_in.mapv(|v| v * t / (t + 1.0))
}

/// Runs one fixture; Ok holds the largest relative error seen, Err describes the first
/// difference from diffusers.
fn check_fixture(fx: &Fixture) -> Result<f64, String> {
    let kind: SamplerKind = fx.sampler.parse().map_err(|e| format!("{e}"))?;
    let cfg = scheduler_config(fx)?;
    let opts = SamplerOptions { eta: fx.eta };
    let mut sampler: Box<dyn Sampler> = match (&fx.img2img, kind) {
        (Some(Img2Img { init_sigma: Some(sigma), .. }), _) => {
            build_from_sigma(kind, &cfg, fx.steps, &opts, *sigma, false)
        }
        (Some(Img2Img { strength: Some(s), .. }), SamplerKind::Lcm) => {
            Lcm::with_strength(&cfg, fx.steps, *s).map(|s| Box::new(s) as Box<dyn Sampler>)
        }
        _ => build(kind, &cfg, fx.steps, &opts),
    }
    .map_err(|e| format!("build({kind}, steps {}, eta {}) failed: {e}", fx.steps, fx.eta))?;

    let ts = sampler.timesteps().to_vec();
    let ts_ok =
        ts.len() == fx.timesteps.len() && ts.iter().zip(&fx.timesteps).all(|(a, b)| (a - b).abs() <= TIMESTEP_TOL);
    if !ts_ok {
        return Err(format!("timesteps differ: rust {ts:?} vs diffusers {:?}", fx.timesteps));
    }
    let sigma = sampler.init_noise_sigma();
    // Written as `!(… <= …)` on a bool so a NaN sigma fails too.
    let sigma_ok = (sigma - fx.init_noise_sigma).abs() <= SIGMA_TOL * fx.init_noise_sigma.abs();
    if !sigma_ok {
        return Err(format!("init_noise_sigma: rust {sigma} vs diffusers {}", fx.init_noise_sigma));
    }
    let mut x = Array4::from_shape_vec(fx.shape, fx.noise.clone()).map_err(|e| format!("bad fixture noise: {e}"))?;
    let start = match &fx.img2img {
        None => {
            let s = sigma as f32;
            x.mapv_inplace(|v| v * s);
            0
        }
        Some(i) => {
            let start = match (kind, i.strength) {
                (SamplerKind::Lcm, _) | (_, None) => 0,
                (_, Some(s)) => img2img_start(sampler.order(), fx.steps, s).map_err(|e| e.to_string())?,
            };
            if start != i.start {
                return Err(format!("img2img starts at timestep {start}, diffusers at {}", i.start));
            }
            let init =
                Array4::from_shape_vec(fx.shape, i.init.clone()).map_err(|e| format!("bad fixture init: {e}"))?;
            let noise = x.clone();
            sampler.add_noise(&init, &noise, start, &mut x);
            start
        }
    };
    if fx.trajectory.len() + start != ts.len() {
        return Err(format!(
            "bad fixture: {} trajectory entries for {} timesteps from {start}",
            fx.trajectory.len(),
            ts.len()
        ));
    }
    let mut noise = Replay::new(&fx.step_noises);
    let n = ts.len();
    let mut max_err = 0.0f64;
    for (i, want) in (start..).zip(&fx.trajectory) {
        let mut x_in = x.clone();
        sampler.scale_model_input(&mut x_in, i);
        let out = dummy_model(&x_in, ts[i]);
        let draws_before = noise.used();
        sampler.step(&out, i, &mut x, &mut noise);
        let here = format!("step {}/{n} (t = {}, noise draws used so far {})", i + 1, ts[i], noise.used());
        if let Some(e) = &noise.error {
            return Err(format!("{here}: {e}"));
        }
        if x.shape() != fx.shape {
            return Err(format!("{here}: sample shape changed to {:?}", x.shape()));
        }
        let got: Vec<f32> = x.iter().copied().collect();
        max_err = max_err.max(rel_err(&got, want).0);
        if let Some(m) = mismatch(&here, &got, want) {
            let drew = noise.used() - draws_before;
            return Err(format!("{m} [this step drew {drew} noise tensor(s)]"));
        }
    }
    let got: Vec<f32> = x.iter().copied().collect();
    if let Some(m) = mismatch("final sample", &got, &fx.final_sample) {
        return Err(m);
    }
    if noise.used() != noise.recorded {
        return Err(format!(
            "the sampler used {} noise draws, diffusers drew {} (trajectory matched)",
            noise.used(),
            noise.recorded
        ));
    }
    Ok(max_err)
}

/// Checks every fixture of one sampler, and fails listing each failing fixture.
fn check_sampler(kind: SamplerKind) {
    let fixtures = load_sampler(kind);
    assert!(fixtures.len() >= MIN_FIXTURES, "{kind}: only {} fixtures", fixtures.len());
    let mut failures = Vec::new();
    for (name, fx) in &fixtures {
        let result = catch_unwind(AssertUnwindSafe(|| check_fixture(fx))).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("panicked: {msg}"))
        });
        match result {
            Ok(err) => eprintln!("ok   {name} (max rel err {err:.2e})"),
            Err(e) => {
                eprintln!("FAIL {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{kind}: {} of {} fixtures differ from diffusers:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn ddim_matches_diffusers() {
    check_sampler(SamplerKind::Ddim);
}

#[test]
fn ddpm_matches_diffusers() {
    check_sampler(SamplerKind::Ddpm);
}

#[test]
fn euler_matches_diffusers() {
    check_sampler(SamplerKind::Euler);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_sampler(SamplerKind::EulerAncestral);
}

#[test]
fn heun_matches_diffusers() {
    check_sampler(SamplerKind::Heun);
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    check_sampler(SamplerKind::DpmPP2M);
}

#[test]
fn lcm_matches_diffusers() {
    check_sampler(SamplerKind::Lcm);
}

#[test]
fn consistency_matches_diffusers() {
    check_sampler(SamplerKind::Consistency);
}

#[test]
fn flow_euler_matches_diffusers() {
    check_sampler(SamplerKind::FlowEuler);
}

#[test]
fn flow_heun_matches_diffusers() {
    check_sampler(SamplerKind::FlowHeun);
}

#[test]
fn every_sampler_has_fixtures() {
    let all = load_all();
    for kind in SamplerKind::ALL {
        let n = all.iter().filter(|(_, fx)| fx.sampler == kind.name()).count();
        assert!(n >= MIN_FIXTURES, "{kind}: {n} fixtures, want at least {MIN_FIXTURES}");
    }
}

/// Each fixture is well formed: its sampler is known and matches the file name, its config parses
/// (deny_unknown_fields catches misspelt keys) and holds no nulls, and the arrays have the sizes
/// the shape and the timesteps call for.
#[test]
fn fixtures_are_well_formed() {
    for (name, fx) in load_all() {
        let kind: SamplerKind = fx.sampler.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(name.starts_with(&format!("{}__", kind.name())), "{name}: file name does not start with {kind}__");
        let obj = fx.config.as_object().unwrap_or_else(|| panic!("{name}: config is not an object"));
        for (k, v) in obj {
            assert!(!v.is_null(), "{name}: config.{k} is null");
        }
        scheduler_config(&fx).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(fx.steps >= 1, "{name}: steps = 0");
        assert!(fx.eta.is_finite() && fx.eta >= 0.0, "{name}: eta = {}", fx.eta);
        if kind != SamplerKind::Ddim {
            assert_eq!(fx.eta, 0.0, "{name}: eta is only for ddim");
        }
        let len: usize = fx.shape.iter().product();
        assert!(len > 0, "{name}: empty shape");
        assert_eq!(fx.noise.len(), len, "{name}: noise");
        assert_eq!(fx.final_sample.len(), len, "{name}: final");
        for (i, d) in fx.step_noises.iter().enumerate() {
            assert_eq!(d.len(), len, "{name}: step_noises[{i}]");
        }
        assert!(!fx.timesteps.is_empty(), "{name}: no timesteps");
        let start = fx.img2img.as_ref().map_or(0, |i| i.start);
        assert_eq!(fx.trajectory.len() + start, fx.timesteps.len(), "{name}: one trajectory entry per timestep run");
        if let Some(i) = &fx.img2img {
            assert_eq!(i.init.len(), len, "{name}: img2img init");
            match (i.strength, i.init_sigma) {
                (Some(s), None) => assert!(s > 0.0 && s <= 1.0, "{name}: strength"),
                (None, Some(sigma)) => assert!(sigma > 0.0 && i.start == 0, "{name}: init_sigma"),
                _ => panic!("{name}: expected a strength or an init_sigma"),
            }
        }
        for (i, x) in fx.trajectory.iter().enumerate() {
            assert_eq!(x.len(), len, "{name}: trajectory[{i}]");
        }
        assert_eq!(fx.trajectory.last().unwrap(), &fx.final_sample, "{name}: final is not the last trajectory entry");
        let second_order = matches!(kind, SamplerKind::Heun | SamplerKind::FlowHeun);
        let model_calls = if second_order { 2 * fx.steps - 1 } else { fx.steps };
        assert_eq!(fx.timesteps.len(), model_calls, "{name}: timesteps for {} steps", fx.steps);
        assert!(fx.init_noise_sigma.is_finite() && fx.init_noise_sigma > 0.0, "{name}: init_noise_sigma");
        let all_finite = fx
            .noise
            .iter()
            .chain(fx.step_noises.iter().flatten())
            .chain(fx.trajectory.iter().flatten())
            .all(|v| v.is_finite());
        assert!(all_finite, "{name}: non-finite value");
    }
}

/// The config check really rejects a misspelt key.
#[test]
fn scheduler_config_rejects_unknown_keys() {
    let bad = serde_json::json!({ "beta_shedule": "linear" });
    assert!(serde_json::from_value::<SchedulerConfig>(bad).is_err());
    let good = serde_json::json!({ "beta_schedule": "linear", "prediction_type": "v_prediction" });
    assert!(serde_json::from_value::<SchedulerConfig>(good).is_ok());
}

/// The harness's own pieces: the error measure and the noise replay.
#[test]
fn harness_detects_differences() {
    let want = [1.0f32, -2.0, 0.5];
    assert_eq!(rel_err(&want, &want).0, 0.0);
    let (err, i) = rel_err(&[1.0, -2.001, 0.5], &want);
    assert!((err - 0.0005).abs() < 1e-6 && i == 1, "{err} at {i}");
    assert!(mismatch("x", &[1.0, -2.001, 0.5], &want).is_some());
    assert!(mismatch("x", &[1.0, -2.0001, 0.5], &want).is_none());
    assert_eq!(rel_err(&[f32::NAN, -2.0, 0.5], &want).0, f64::INFINITY);
    // An all-zero reference is compared against the 1e-3 floor, not divided by zero.
    assert!(mismatch("x", &[5e-8, 0.0], &[0.0, 0.0]).is_none());
    assert!(mismatch("x", &[2e-7, 0.0], &[0.0, 0.0]).is_some());

    let mut replay = Replay::new(&[vec![1.0, 2.0], vec![3.0, 4.0]]);
    let mut out = Array4::<f32>::zeros((1, 1, 1, 2));
    replay.fill(&mut out);
    assert_eq!(out.as_slice().unwrap(), &[1.0, 2.0]);
    replay.fill(&mut out);
    assert_eq!(out.as_slice().unwrap(), &[3.0, 4.0]);
    assert!(replay.error.is_none());
    assert_eq!(replay.used(), 2);
    replay.fill(&mut out);
    assert!(replay.error.is_some(), "overdrawing the recording must be an error");
    assert!(out.iter().all(|v| v.is_nan()));

    let mut wrong_size = Replay::new(&[vec![1.0; 3]]);
    wrong_size.fill(&mut out);
    assert!(wrong_size.error.is_some());
}
