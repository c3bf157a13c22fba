//! How the library fails: the bad inputs of `cli_errors.rs`, through the library API.
//!
//! Every case checks the `Error` variant and its fields, not only the text: a caller embedding
//! edge-diffuse must be able to tell a bad card (`Card`, naming `model.toml`) from a missing
//! folder (`Io`), a bad ONNX file (`Model`), a bad request (`Config`, naming the field), bad
//! noise (`Tensor`), a model that goes numerically bad (`NonFinite`, naming the step) and a run
//! stopped by its callback (`Cancelled`). A panic fails the case. The last cases check that a
//! pipeline stays usable after a failed request.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use edge_diffuse::pipeline::{LoadOptions, Pipeline, Request, StepInfo};
use edge_diffuse::{Error, ModelCard, SamplerKind};
use ndarray::Array4;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn student() -> PathBuf {
    repo().join("models/fmnist-student")
}

fn shipped_card() -> String {
    std::fs::read_to_string(student().join("model.toml")).expect("read the shipped model.toml")
}

/// `text` with `from` replaced by `to`; `from` must occur exactly once.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "the shipped model.toml should hold {from:?} exactly once");
    text.replacen(from, to, 1)
}

fn opts() -> LoadOptions {
    LoadOptions { threads: 1, ..Default::default() }
}

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// A temporary model directory: a copy of the shipped student, then edited.
struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::Builder::new().prefix("lib-errors-").tempdir().unwrap();
        std::fs::copy(student().join("denoiser.onnx"), tmp.path().join("denoiser.onnx")).unwrap();
        std::fs::write(tmp.path().join("model.toml"), shipped_card()).unwrap();
        Dir { tmp }
    }

    fn with_card(card: &str) -> Dir {
        let d = Dir::new();
        std::fs::write(d.path().join("model.toml"), card).unwrap();
        d
    }

    fn with_edit(from: &str, to: &str) -> Dir {
        Dir::with_card(&edit(&shipped_card(), from, to))
    }

    fn with_onnx(bytes: &[u8]) -> Dir {
        let d = Dir::new();
        std::fs::write(d.path().join("denoiser.onnx"), bytes).unwrap();
        d
    }

    fn with_bad_fixture(name: &str) -> Dir {
        let src = repo().join("tests/fixtures/bad").join(format!("{name}.onnx"));
        Dir::with_onnx(
            &std::fs::read(&src).unwrap_or_else(|e| panic!("{}: {e} (run tools/gen_bad_fixtures.py)", src.display())),
        )
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn load(&self) -> edge_diffuse::Result<Pipeline> {
        Pipeline::load(self.path(), opts())
    }
}

/// The error of a load that must fail.
fn load_err(dir: &Dir) -> Error {
    match dir.load() {
        Ok(_) => panic!("loading {} succeeded, expected an error", dir.path().display()),
        Err(e) => e,
    }
}

/// The error of a request on the shipped student that must fail.
fn generate_err(req: &Request) -> Error {
    let mut pipe = Pipeline::load(student(), opts()).expect("load the shipped student");
    match pipe.generate(req, &mut go) {
        Ok(_) => panic!("{req:?} succeeded, expected an error"),
        Err(e) => e,
    }
}

/// Checks a `Card` error naming `<dir>/model.toml` and every one of `needles`.
fn assert_card_error(e: Error, dir: &Dir, needles: &[&str]) {
    match &e {
        Error::Card { path, message } => {
            assert_eq!(path, &dir.path().join("model.toml"), "{e}");
            for n in needles {
                assert!(message.contains(n), "the message does not name {n:?}: {e}");
            }
        }
        other => panic!("expected Error::Card, got {other:?}"),
    }
}

/// Checks a `Model` error naming `<dir>/denoiser.onnx` and every one of `needles`.
fn assert_model_error(e: Error, dir: &Dir, needles: &[&str]) {
    match &e {
        Error::Model { path, message } => {
            assert_eq!(path, &dir.path().join("denoiser.onnx"), "{e}");
            for n in needles {
                assert!(message.contains(n), "the message does not name {n:?}: {e}");
            }
        }
        other => panic!("expected Error::Model, got {other:?}"),
    }
}

/// Checks a `Config` error for `field`.
fn assert_config_error(e: Error, want: &str, needles: &[&str]) {
    match &e {
        Error::Config { field, message } => {
            assert_eq!(field, want, "{e}");
            for n in needles {
                assert!(message.contains(n), "the message does not name {n:?}: {e}");
            }
        }
        other => panic!("expected Error::Config {{ field: {want:?} }}, got {other:?}"),
    }
}

/// Checks a `Tensor` error about the noise.
fn assert_noise_error(e: Error, needles: &[&str]) {
    match &e {
        Error::Tensor { what, message } => {
            assert_eq!(what, "noise", "{e}");
            for n in needles {
                assert!(message.contains(n), "the message does not name {n:?}: {e}");
            }
        }
        other => panic!("expected Error::Tensor, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The card.

#[test]
fn card_syntax_error() {
    let d = Dir::with_edit("channels = 1", "channels = = 1");
    assert_card_error(load_err(&d), &d, &["channels"]);
}

#[test]
fn card_unknown_scheduler_key() {
    let d = Dir::with_edit("[scheduler]\n", "[scheduler]\nbeta_shedule = \"linear\"\n");
    assert_card_error(load_err(&d), &d, &["beta_shedule"]);
}

#[test]
fn card_unknown_beta_schedule() {
    let d = Dir::with_edit("beta_schedule = \"squaredcos_cap_v2\"", "beta_schedule = \"cosine\"");
    assert_card_error(load_err(&d), &d, &["scheduler.beta_schedule", "cosine"]);
}

#[test]
fn card_channels_zero() {
    let d = Dir::with_edit("channels = 1", "channels = 0");
    assert_card_error(load_err(&d), &d, &["image.channels"]);
}

#[test]
fn card_defaults_steps_zero() {
    let d = Dir::with_edit("steps = 2", "steps = 0");
    assert_card_error(load_err(&d), &d, &["defaults.steps"]);
}

#[test]
fn card_beta_end_out_of_range_at_generate() {
    // A scheduler value that only the sampler checks: the error still names the card.
    let card = edit(
        &shipped_card(),
        "beta_schedule = \"squaredcos_cap_v2\"",
        "beta_schedule = \"linear\"\nbeta_start = 0.0001\nbeta_end = 1.5",
    );
    let d = Dir::with_card(&card);
    let mut pipe = d.load().expect("the card parses; the schedule is checked per sampler");
    let e = pipe.generate(&Request::default(), &mut go).unwrap_err();
    assert_card_error(e, &d, &["scheduler.betas", "beta_end"]);
}

#[test]
fn missing_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    match Pipeline::load(&missing, opts()) {
        Err(Error::Io { path, error }) => {
            assert!(path.starts_with(&missing), "{}", path.display());
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        }
        Err(other) => panic!("expected Error::Io, got {other:?}"),
        Ok(_) => panic!("loading a missing folder succeeded"),
    }
}

#[test]
fn missing_model_toml() {
    let d = Dir::new();
    std::fs::remove_file(d.path().join("model.toml")).unwrap();
    match load_err(&d) {
        Error::Io { path, error } => {
            assert_eq!(path, d.path().join("model.toml"));
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The ONNX file.

#[test]
fn onnx_missing() {
    let d = Dir::with_edit("onnx = \"denoiser.onnx\"", "onnx = \"missing.onnx\"");
    match load_err(&d) {
        Error::Io { path, error } => {
            assert_eq!(path, d.path().join("missing.onnx"));
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn onnx_truncated() {
    let bytes = std::fs::read(student().join("denoiser.onnx")).unwrap();
    let d = Dir::with_onnx(&bytes[..1000]);
    assert_model_error(load_err(&d), &d, &[]);
}

#[test]
fn onnx_truncated_at_half() {
    let bytes = std::fs::read(student().join("denoiser.onnx")).unwrap();
    let d = Dir::with_onnx(&bytes[..bytes.len() / 2]);
    assert_model_error(load_err(&d), &d, &[]);
}

#[test]
fn onnx_garbage() {
    let d = Dir::with_onnx(b"this is not an onnx model, just some text\n");
    assert_model_error(load_err(&d), &d, &["ONNX"]);
}

#[test]
fn onnx_empty() {
    let d = Dir::with_onnx(b"");
    assert_model_error(load_err(&d), &d, &["empty"]);
}

#[test]
fn onnx_path_is_a_folder() {
    let d = Dir::with_edit("onnx = \"denoiser.onnx\"", "onnx = \"weights\"");
    std::fs::create_dir(d.path().join("weights")).unwrap();
    match load_err(&d) {
        Error::Model { path, .. } => assert_eq!(path, d.path().join("weights")),
        other => panic!("expected Error::Model, got {other:?}"),
    }
}

#[test]
fn onnx_garbage_from_bytes() {
    let card = ModelCard::load(student()).unwrap();
    match Pipeline::from_bytes(card.clone(), b"\x08\x01garbage", opts()) {
        Err(Error::Model { path, message }) => {
            assert_eq!(path, card.onnx_path(), "from_bytes labels errors with the card's ONNX path");
            assert!(message.contains("ONNX"), "{message}");
        }
        Err(other) => panic!("expected Error::Model, got {other:?}"),
        Ok(_) => panic!("garbage bytes loaded"),
    }
}

#[test]
fn card_input_name_missing_from_onnx() {
    let d = Dir::with_edit("sample = \"sample\"", "sample = \"latent\"");
    assert_model_error(load_err(&d), &d, &["model.inputs.sample", "latent"]);
}

#[test]
fn card_output_name_missing_from_onnx() {
    let d = Dir::with_edit("onnx = \"denoiser.onnx\"\n", "onnx = \"denoiser.onnx\"\noutput = \"eps\"\n");
    assert_model_error(load_err(&d), &d, &["model.output", "eps"]);
}

#[test]
fn image_height_disagrees_with_onnx() {
    let d = Dir::with_edit("height = 32", "height = 16");
    assert_model_error(load_err(&d), &d, &["image.height"]);
}

#[test]
fn onnx_graphs_that_are_not_denoisers() {
    for (fixture, needle) in [
        ("flatten_output", "output"),
        ("int_output", "output"),
        ("renamed_inputs", "model.inputs.sample"),
        ("extra_input", "mask"),
        ("timestep_rank2", "timestep"),
    ] {
        let d = Dir::with_bad_fixture(fixture);
        assert_model_error(load_err(&d), &d, &[needle]);
    }
}

// ---------------------------------------------------------------------------------------------
// The request.

#[test]
fn steps_zero() {
    let e = generate_err(&Request { steps: Some(0), ..Default::default() });
    assert_config_error(e, "steps", &["0"]);
}

#[test]
fn steps_above_num_train_timesteps() {
    for sampler in [SamplerKind::Ddim, SamplerKind::Euler, SamplerKind::Ddpm] {
        let e = generate_err(&Request { sampler: Some(sampler), steps: Some(5000), ..Default::default() });
        assert_config_error(e, "steps", &["1000", "5000"]);
    }
}

#[test]
fn lcm_steps_above_original_inference_steps() {
    let e = generate_err(&Request { sampler: Some(SamplerKind::Lcm), steps: Some(60), ..Default::default() });
    assert_config_error(e, "steps", &["original_inference_steps"]);
}

#[test]
fn unknown_sampler() {
    let e = "plms".parse::<SamplerKind>().unwrap_err();
    assert_config_error(e, "sampler", &["plms", "ddim"]);
}

#[test]
fn unknown_class_name() {
    let card = ModelCard::load(student()).unwrap();
    let e = card.class_label("hat").unwrap_err();
    assert_config_error(e, "class", &["hat", "sneaker"]);
}

#[test]
fn class_label_out_of_range() {
    let e = generate_err(&Request { classes: Some(vec![42]), ..Default::default() });
    assert_config_error(e, "class", &["42"]);
}

#[test]
fn class_list_empty() {
    let e = generate_err(&Request { classes: Some(vec![]), ..Default::default() });
    assert_config_error(e, "class", &[]);
}

#[test]
fn guidance_not_finite() {
    let e = generate_err(&Request { guidance: Some(f32::NAN), ..Default::default() });
    assert_config_error(e, "guidance", &["NaN"]);
}

#[test]
fn guidance_without_null_class() {
    let d = Dir::with_edit("null = 10\n", "");
    let mut pipe = d.load().unwrap();
    let req = Request { classes: Some(vec![3]), guidance: Some(2.0), ..Default::default() };
    assert_config_error(pipe.generate(&req, &mut go).unwrap_err(), "guidance", &["null"]);
}

#[test]
fn eta_negative() {
    let e = generate_err(&Request { sampler: Some(SamplerKind::Ddim), eta: Some(-1.0), ..Default::default() });
    assert_config_error(e, "eta", &["-1"]);
}

#[test]
fn noise_wrong_shape() {
    let e = generate_err(&Request { noise: Some(Array4::zeros((1, 1, 16, 16))), ..Default::default() });
    assert_noise_error(e, &["[batch, 1, 32, 32]", "16"]);
}

#[test]
fn noise_empty_batch() {
    let e = generate_err(&Request { noise: Some(Array4::zeros((0, 1, 32, 32))), ..Default::default() });
    assert_noise_error(e, &["[batch, 1, 32, 32]"]);
}

#[test]
fn noise_with_nan() {
    let mut noise = Array4::<f32>::zeros((2, 1, 32, 32));
    noise[[1, 0, 5, 5]] = f32::NAN;
    noise[[1, 0, 6, 6]] = f32::INFINITY;
    let e = generate_err(&Request { noise: Some(noise), ..Default::default() });
    assert_noise_error(e, &["2 non-finite"]);
}

// ---------------------------------------------------------------------------------------------
// Running.

/// A model directory whose denoiser outputs NaN below timestep 500 (fixture `nan_below_500`),
/// with trailing spacing so that 4 DDIM steps visit timesteps 999, 749, 499, 249.
fn nan_model() -> Dir {
    let d = Dir::with_bad_fixture("nan_below_500");
    std::fs::write(
        d.path().join("model.toml"),
        edit(&shipped_card(), "timestep_spacing = \"leading\"", "timestep_spacing = \"trailing\""),
    )
    .unwrap();
    d
}

#[test]
fn non_finite_output_names_the_step() {
    let d = nan_model();
    let mut pipe = d.load().expect("the NaN fixture is a valid denoiser for the card");
    let req = Request { sampler: Some(SamplerKind::Ddim), steps: Some(4), num_images: 2, ..Default::default() };
    let mut seen = Vec::new();
    let e = pipe
        .generate(&req, &mut |s| {
            seen.push((s.image, s.step));
            ControlFlow::Continue(())
        })
        .unwrap_err();
    match e {
        Error::NonFinite { step, total, timestep, count } => {
            assert_eq!((step, total), (3, 4), "{e}");
            assert_eq!(timestep, 499.0, "{e}");
            assert_eq!(count, 32 * 32, "{e}");
            let text = e.to_string();
            assert!(text.contains("step 3 of 4") && text.contains("timestep 499"), "{text}");
        }
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    // Steps 1 and 2 of the first image ran and were reported; the bad step was not.
    assert_eq!(seen, [(0, 1), (0, 2)]);
}

#[test]
fn non_finite_output_is_fine_above_500() {
    // The same model with 1 trailing DDIM step (timestep 999 only) runs to the end: the
    // failure above comes from timestep 499, not from the fixture being unusable.
    let d = nan_model();
    let mut pipe = d.load().unwrap();
    let req = Request { sampler: Some(SamplerKind::Ddim), steps: Some(1), ..Default::default() };
    let out = pipe.generate(&req, &mut go).expect("finite at timestep 999");
    assert!(out.samples.iter().all(|v| v.is_finite()));
}

#[test]
fn cancelled_at_step_two() {
    let mut pipe = Pipeline::load(student(), opts()).unwrap();
    let req = Request { sampler: Some(SamplerKind::Ddim), steps: Some(4), num_images: 3, ..Default::default() };
    let mut calls = 0;
    let e = pipe
        .generate(&req, &mut |s| {
            calls += 1;
            if s.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    match e {
        Error::Cancelled { step } => assert_eq!(step, 2),
        other => panic!("expected Error::Cancelled, got {other:?}"),
    }
    assert_eq!(calls, 2, "generation must stop at the first Break");
}

// ---------------------------------------------------------------------------------------------
// A failed request leaves the pipeline usable.

#[test]
fn pipeline_is_usable_after_failed_requests() {
    let req = Request { seed: 3, num_images: 2, classes: Some(vec![7]), ..Default::default() };
    let reference = Pipeline::load(student(), opts()).unwrap().generate(&req, &mut go).unwrap().samples;

    let mut pipe = Pipeline::load(student(), opts()).unwrap();
    assert!(matches!(
        pipe.generate(&Request { steps: Some(0), ..Default::default() }, &mut go),
        Err(Error::Config { .. })
    ));
    let bad_noise = Request { noise: Some(Array4::from_elem((1, 1, 32, 32), f32::NAN)), ..Default::default() };
    assert!(matches!(pipe.generate(&bad_noise, &mut go), Err(Error::Tensor { .. })));
    let cancelled =
        pipe.generate(&req, &mut |s| if s.step == 1 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) });
    assert!(matches!(cancelled, Err(Error::Cancelled { step: 1 })));

    let again = pipe.generate(&req, &mut go).expect("the pipeline still works").samples;
    assert_eq!(again, reference, "a failed or cancelled request changed later results");
}
