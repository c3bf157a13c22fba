//! criterion benches of the runtime on the shipped models (1 thread, as on a small board core):
//!
//! - `denoiser_call/<model>`: one model call at batch 1;
//! - `guided_step/<layout>`: one classifier-free-guided step of the teacher, as two batch-1 calls
//!   (the default) and as one batch-2 call;
//! - `sample/<model>`: one whole image at the card's default sampler and steps;
//! - `sampler_math/<sampler>`: one `step` of each sampler on a 1×1×32×32 sample, no model.
//!
//!     cargo bench --bench runtime            # or: cargo bench --bench runtime -- sampler_math
//!
//! `EDGE_DIFFUSE_BENCH_THREADS` sets the model's threads (default 1).

use std::hint::black_box;
use std::ops::ControlFlow;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use edge_diffuse::card::ModelCard;
use edge_diffuse::noise::SeededNoise;
use edge_diffuse::pipeline::{GuidanceBatching, LoadOptions, Pipeline, Request};
use edge_diffuse::runtime::Denoiser;
use edge_diffuse::sampler::{self, NoiseSource, SamplerKind, SamplerOptions};
use ndarray::Array4;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name)
}

fn threads() -> usize {
    std::env::var("EDGE_DIFFUSE_BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1)
}

fn sample_input() -> Array4<f32> {
    let mut x = Array4::zeros((1, 1, 32, 32));
    SeededNoise::new(0, 0, 1).fill(&mut x);
    x
}

fn denoiser_call(c: &mut Criterion) {
    let mut g = c.benchmark_group("denoiser_call");
    for name in ["fmnist-student", "fmnist-teacher"] {
        let card = ModelCard::load(model_dir(name)).expect("shipped card");
        let mut den = Denoiser::load(&card, threads()).expect("shipped model");
        let x = sample_input();
        let mut out = Array4::zeros(x.raw_dim());
        den.prepare(1).expect("plan");
        g.bench_function(name, |b| {
            b.iter(|| den.predict(black_box(&x), 499.0, Some(&[3]), None, &mut out).expect("call"))
        });
    }
    g.finish();
}

fn guided_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("guided_step");
    for (label, batching) in [("two_calls", GuidanceBatching::TwoCalls), ("batched", GuidanceBatching::Batched)] {
        let opts = LoadOptions { threads: threads(), guidance_batching: batching, ..Default::default() };
        let mut pipe = Pipeline::load(model_dir("fmnist-teacher"), opts).expect("shipped model");
        let req = Request { steps: Some(1), guidance: Some(2.0), classes: Some(vec![3]), ..Default::default() };
        g.bench_function(label, |b| {
            b.iter(|| pipe.generate(black_box(&req), &mut |_| ControlFlow::Continue(())).expect("step"))
        });
    }
    g.finish();
}

fn sample(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample");
    g.sample_size(10);
    for name in ["fmnist-student", "fmnist-teacher"] {
        let opts = LoadOptions { threads: threads(), ..Default::default() };
        let mut pipe = Pipeline::load(model_dir(name), opts).expect("shipped model");
        let req = Request { classes: Some(vec![3]), ..Default::default() };
        g.bench_function(name, |b| {
            b.iter(|| pipe.generate(black_box(&req), &mut |_| ControlFlow::Continue(())).expect("image"))
        });
    }
    g.finish();
}

fn sampler_math(c: &mut Criterion) {
    let mut g = c.benchmark_group("sampler_math");
    let card = ModelCard::load(model_dir("fmnist-teacher")).expect("shipped card");
    let model_out = sample_input();
    for kind in SamplerKind::ALL {
        let steps = 4;
        let mut s = sampler::build(kind, &card.scheduler, steps, &SamplerOptions { eta: 0.5 }).expect("sampler");
        let mut noise = SeededNoise::new(1, 0, 1);
        g.bench_function(kind.name(), |b| {
            b.iter_batched_ref(
                sample_input,
                |x| {
                    s.scale_model_input(x, 1);
                    s.step(black_box(&model_out), 1, x, &mut noise);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, denoiser_call, guided_step, sample, sampler_math);
criterion_main!(benches);
