//! The embedding API: a pipeline loaded once (from a folder or from bytes), generating into
//! caller buffers, moved and shared between threads, cancelled from its callback.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};

use edge_diffuse::pipeline::{RunInfo, StepInfo};
use edge_diffuse::{Error, LoadOptions, ModelCard, Pipeline, Request, SamplerKind};

fn model() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student")
}

fn load() -> Pipeline {
    Pipeline::load(model(), LoadOptions { threads: 1, ..Default::default() }).unwrap()
}

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn pipeline_is_send_and_sync() {
    assert_send_sync::<Pipeline>();
    assert_send_sync::<edge_diffuse::runtime::Denoiser>();
    assert_send_sync::<Error>();
}

#[test]
fn generate_into_matches_generate_and_pixels_match_the_png_path() {
    let mut pipe = load();
    let req = Request { seed: 3, num_images: 3, classes: Some(vec![1, 5]), ..Default::default() };
    let gen = pipe.generate(&req, &mut go).unwrap();
    // A longer buffer is fine; what lies past the images stays as it was.
    let mut buf = vec![f32::NAN; pipe.output_len(&req) + 5];
    let info = pipe.generate_into(&req, &mut buf, &mut go).unwrap();
    let stages = info.stages;
    assert_eq!(info, RunInfo { images: 3, sampler: SamplerKind::Lcm, steps: 2, timesteps: 2, guidance: 1.0, stages });
    assert_eq!(stages, Default::default(), "no text encoder, no decoder");
    let want = gen.samples.as_slice().unwrap();
    assert!(buf[..want.len()].iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(buf[want.len()..].iter().all(|v| v.is_nan()));

    let mut pixels = vec![0u8; want.len()];
    assert_eq!(pipe.pixels_into(want, &mut pixels).unwrap(), 3);
    let range = pipe.card().image.value_range;
    for i in 0..3 {
        let one = gen.samples.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
        let png = edge_diffuse::files::grid_image(&one, 1, range).into_luma8().into_raw();
        assert_eq!(png[..], pixels[i * 1024..(i + 1) * 1024], "image {i}");
    }
}

#[test]
fn short_buffers_are_errors_before_any_work() {
    let mut pipe = load();
    let req = Request { num_images: 2, ..Default::default() };
    let mut steps = 0;
    let mut short = vec![0f32; 2047];
    let err = pipe.generate_into(&req, &mut short, &mut |_| {
        steps += 1;
        ControlFlow::Continue(())
    });
    match err {
        Err(Error::BufferTooSmall { what: "sample buffer", needed: 2048, got: 2047 }) => {}
        other => panic!("expected BufferTooSmall, got {other:?}"),
    }
    assert_eq!(steps, 0);
    let err = pipe.pixels_into(&[0.0; 2048], &mut [0u8; 2000]).unwrap_err();
    assert!(matches!(err, Error::BufferTooSmall { what: "pixel buffer", needed: 2048, got: 2000 }), "{err:?}");
    assert_eq!(err.to_string(), "pixel buffer: holds 2000 values, the request needs 2048");
}

#[test]
fn cancel_then_generate_again() {
    let mut pipe = load();
    let req = Request { seed: 11, classes: Some(vec![2]), ..Default::default() };
    let mut buf = vec![0f32; pipe.output_len(&req)];
    let mut seen = Vec::new();
    let err = pipe
        .generate_into(&req, &mut buf, &mut |s| {
            seen.push((s.step, s.total));
            ControlFlow::Break(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { step: 1 }), "{err:?}");
    assert_eq!(seen, [(1, 2)]);
    let after = pipe.generate(&req, &mut go).unwrap();
    let fresh = load().generate(&req, &mut go).unwrap();
    assert_eq!(after.samples, fresh.samples, "a cancelled run must leave no state behind");
}

#[test]
fn from_bytes_equals_load() {
    let card_text = std::fs::read_to_string(Path::new(model()).join("model.toml")).unwrap();
    let onnx = std::fs::read(Path::new(model()).join("denoiser.onnx")).unwrap();
    let card = ModelCard::parse(&card_text, Path::new(""), Path::new("model.toml")).unwrap();
    let mut from_bytes = Pipeline::from_bytes(card, &onnx, LoadOptions { threads: 1, ..Default::default() }).unwrap();
    drop(onnx);
    assert!(!from_bytes.denoiser().holds_graph(), "a pipeline keeps only its plans");
    let req = Request { seed: 5, classes: Some(vec![9]), ..Default::default() };
    let a = from_bytes.generate(&req, &mut go).unwrap();
    let b = load().generate(&req, &mut go).unwrap();
    assert_eq!(a.samples, b.samples);
}

#[test]
fn a_pipeline_runs_every_guidance_strategy_without_its_source_graph() {
    use edge_diffuse::pipeline::GuidanceBatching;
    let teacher = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-teacher");
    let req = Request { seed: 3, steps: Some(2), classes: Some(vec![4]), ..Default::default() };
    let mut images = vec![];
    for batching in [GuidanceBatching::TwoCalls, GuidanceBatching::Batched] {
        let mut pipe =
            Pipeline::load(teacher, LoadOptions { threads: 1, guidance_batching: batching, ..Default::default() })
                .unwrap();
        assert!(!pipe.denoiser().holds_graph(), "{batching:?}: the source graph was kept");
        images.push(pipe.generate(&req, &mut go).unwrap().samples);
    }
    // One batch-2 call against two batch-1 calls: the same images up to float rounding.
    let diff = images[0].iter().zip(&images[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "batched guidance differs from two calls by {diff}");
}

#[test]
fn a_pipeline_moves_to_a_thread_and_is_shared_behind_a_mutex() {
    let req = Request { seed: 1, classes: Some(vec![0]), ..Default::default() };
    let want = load().generate(&req, &mut go).unwrap().samples;

    let pipe = load();
    let r = req.clone();
    let (pipe, moved) = std::thread::spawn(move || {
        let mut pipe = pipe;
        let out = pipe.generate(&r, &mut go).unwrap().samples;
        (pipe, out)
    })
    .join()
    .unwrap();
    assert_eq!(moved, want);

    let shared = Arc::new(Mutex::new(pipe));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let shared = Arc::clone(&shared);
            let r = req.clone();
            std::thread::spawn(move || shared.lock().unwrap().generate(&r, &mut go).unwrap().samples)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
    // `Sync`: a shared reference reads the card from several threads at once.
    let pipe = Arc::new(load());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| assert_eq!(pipe.image_len(), 1024));
        }
    });
}
