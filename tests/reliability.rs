//! Reliability of a loaded pipeline: the model file may change under it, and the same request
//! gives the same samples.
//!
//! * Model files: `Denoiser::load` maps the ONNX file only while decoding it, and tract keeps
//!   its own copy of the weights, so truncating, overwriting or deleting the file after
//!   `Pipeline::load` must change nothing, not even for a plan built afterwards (a new batch
//!   size).
//! * Determinism: the same request twice in one process, or in two pipelines, gives
//!   bit-identical samples; a pipeline on 1 thread and one on 2 threads agree within 1e-4.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use edge_diffuse::pipeline::{GuidanceBatching, LoadOptions, Pipeline, Request, StepInfo};
use edge_diffuse::SamplerKind;
use ndarray::Array4;

fn student() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student")
}

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn generate(pipe: &mut Pipeline, req: &Request) -> Array4<f32> {
    pipe.generate(req, &mut go).expect("generate").samples
}

/// Bit-for-bit equality (`==` on floats would also accept 0.0 == -0.0).
fn assert_bit_identical(a: &Array4<f32>, b: &Array4<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}");
    let differing = a.iter().zip(b.iter()).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{what}: {differing} of {} values differ", a.len());
}

fn max_abs_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// ---------------------------------------------------------------------------------------------
// The model file changes after loading.

/// A copy of the student in a temporary folder.
fn student_copy() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new().prefix("reliability-").tempdir().unwrap();
    for f in ["denoiser.onnx", "model.toml"] {
        std::fs::copy(student().join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

/// An unguided request (batch-1 plan, built at load) and a guided one; with batched guidance
/// the guided one needs a batch-2 plan, built at its first use.
fn requests() -> (Request, Request) {
    let plain = Request { seed: 11, num_images: 2, classes: Some(vec![7, 1]), ..Default::default() };
    let guided = Request { guidance: Some(2.0), ..plain.clone() };
    (plain, guided)
}

/// Loads the copy, generates references, lets `change` alter the ONNX file in place, then
/// generates again: the results must be the same bits, including from a plan built after the
/// change.
fn survives_file_change(change: impl FnOnce(&Path)) {
    let tmp = student_copy();
    let opts = LoadOptions { threads: 1, guidance_batching: GuidanceBatching::Batched, ..Default::default() };
    let (plain, guided) = requests();
    // The guided reference from another pipeline, so `pipe` builds its batch-2 plan only after
    // the change.
    let guided_ref = generate(&mut Pipeline::load(tmp.path(), opts.clone()).unwrap(), &guided);

    let mut pipe = Pipeline::load(tmp.path(), opts).unwrap();
    let plain_ref = generate(&mut pipe, &plain);
    change(&tmp.path().join("denoiser.onnx"));

    assert_bit_identical(&generate(&mut pipe, &plain), &plain_ref, "unguided, after the change");
    assert_bit_identical(&generate(&mut pipe, &guided), &guided_ref, "guided (new batch-2 plan), after the change");
    assert_bit_identical(&generate(&mut pipe, &plain), &plain_ref, "unguided, again");
}

#[test]
fn model_file_truncated_after_load() {
    survives_file_change(|onnx| {
        // In place, as `truncate -s 0` does: the inode stays the same.
        std::fs::OpenOptions::new().write(true).open(onnx).unwrap().set_len(0).unwrap();
        assert_eq!(std::fs::metadata(onnx).unwrap().len(), 0);
    });
}

#[test]
fn model_file_overwritten_with_garbage_after_load() {
    survives_file_change(|onnx| {
        // Same length, same inode, every byte changed: what a stale map would see.
        use std::io::Write;
        let len = std::fs::metadata(onnx).unwrap().len() as usize;
        let garbage: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8 ^ 0xa5).collect();
        let mut f = std::fs::OpenOptions::new().write(true).open(onnx).unwrap();
        f.write_all(&garbage).unwrap();
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(onnx).unwrap(), garbage);
    });
}

#[test]
fn model_file_deleted_after_load() {
    survives_file_change(|onnx| std::fs::remove_file(onnx).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Determinism.

/// Requests over the sampler kinds, stochastic ones (ddpm, euler_ancestral, lcm, ddim η > 0)
/// included, guided and unguided.
fn determinism_requests() -> Vec<Request> {
    let base = Request { seed: 5, num_images: 3, classes: Some(vec![0, 3, 8]), ..Default::default() };
    vec![
        base.clone(),
        Request {
            sampler: Some(SamplerKind::Ddim),
            steps: Some(4),
            eta: Some(1.0),
            guidance: Some(2.0),
            ..base.clone()
        },
        Request { sampler: Some(SamplerKind::Ddpm), steps: Some(4), ..base.clone() },
        Request { sampler: Some(SamplerKind::EulerAncestral), steps: Some(4), ..base.clone() },
        Request { sampler: Some(SamplerKind::Heun), steps: Some(3), guidance: Some(1.5), ..base.clone() },
        Request { sampler: Some(SamplerKind::DpmPP2M), steps: Some(4), ..base },
    ]
}

#[test]
fn same_request_twice_is_bit_identical() {
    let mut pipe = Pipeline::load(student(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    for req in determinism_requests() {
        let a = generate(&mut pipe, &req);
        let b = generate(&mut pipe, &req);
        assert_bit_identical(&a, &b, &format!("{:?} twice in one pipeline", req.sampler));
    }
}

#[test]
fn two_pipelines_are_bit_identical() {
    let opts = LoadOptions { threads: 1, ..Default::default() };
    let mut p1 = Pipeline::load(student(), opts.clone()).unwrap();
    let mut p2 = Pipeline::load(student(), opts).unwrap();
    for req in determinism_requests() {
        assert_bit_identical(&generate(&mut p1, &req), &generate(&mut p2, &req), &format!("{:?}", req.sampler));
    }
}

#[test]
fn image_alone_equals_image_in_a_request() {
    // Image i of a request is noise stream i of the seed, so image 0 of a 3-image request is
    // the image of the same 1-image request.
    let mut pipe = Pipeline::load(student(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let three = generate(&mut pipe, &Request { seed: 9, num_images: 3, classes: Some(vec![4]), ..Default::default() });
    let one = generate(&mut pipe, &Request { seed: 9, num_images: 1, classes: Some(vec![4]), ..Default::default() });
    assert_bit_identical(&three.slice(ndarray::s![0..1, .., .., ..]).to_owned(), &one, "image 0");
}

#[test]
fn one_thread_and_two_threads_agree() {
    let mut p1 = Pipeline::load(student(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let mut p2 = Pipeline::load(student(), LoadOptions { threads: 2, ..Default::default() }).unwrap();
    assert_eq!((p1.denoiser().threads(), p2.denoiser().threads()), (1, 2));
    for req in determinism_requests() {
        let d = max_abs_diff(&generate(&mut p1, &req), &generate(&mut p2, &req));
        assert!(d <= 1e-4, "{:?}: 1 and 2 threads differ by up to {d}", req.sampler);
    }
}
