//! Real-world exports load and match onnxruntime (issue 22, item 4).
//!
//! `tests/fixtures/corpus/NAME/` holds an ONNX export with random weights (written by
//! `tools/make_corpus.py`; the table is at its top), its inputs `input_<i>_<name>.npy` in graph
//! order and onnxruntime's output `output.npy`, at batch 2. Each test loads one model through
//! edge-diffuse and checks one call against that output: max |ours − ort| / max |ort| ≤ 1e-4.
//!
//! Denoisers run through their card: `Denoiser::load` + `prepare` + `predict_with` (the
//! consistency model with its `sigma` input and `difficulty` conditioning, SD3 with
//! `pooled_projections`). The decoders run through `runtime::run_graph` (same loader, same
//! float32 rewrites).

use std::path::{Path, PathBuf};

use edge_diffuse::card::TimeInput;
use edge_diffuse::runtime::{run_graph, Conditions, Denoiser, Graph, PlanCache, PlanFile, WeightPrecision};
use edge_diffuse::ModelCard;
use ndarray::{s, ArrayD, Axis, Ix4};
use ndarray_npy::ReadNpyExt;

const REL_TOL: f32 = 1e-4;

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus").join(name)
}

/// An input as stored: float32, or int64 (timesteps, class labels).
enum Input {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl Input {
    fn as_f32(&self) -> ArrayD<f32> {
        match self {
            Input::F32(a) => a.clone(),
            Input::I64(a) => a.mapv(|v| v as f32),
        }
    }
}

fn open(path: &Path) -> std::io::BufReader<std::fs::File> {
    std::io::BufReader::new(std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The reference inputs of `name`, in graph order, with their graph input names.
fn inputs(name: &str) -> Vec<(String, Input)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder(name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("input_"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap();
            let input = stem.splitn(3, '_').nth(2).unwrap().to_string();
            let value = match ArrayD::<f32>::read_npy(open(p)) {
                Ok(a) => Input::F32(a),
                Err(_) => {
                    Input::I64(ArrayD::<i64>::read_npy(open(p)).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
                }
            };
            (input, value)
        })
        .collect()
}

fn expected(name: &str) -> ArrayD<f32> {
    ArrayD::<f32>::read_npy(open(&folder(name).join("output.npy"))).unwrap()
}

fn check(name: &str, got: &ArrayD<f32>) {
    check_against(name, got, &expected(name));
}

fn check_against(name: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{name}: output shape");
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = want.iter().map(|b| b.abs()).fold(0.0f32, f32::max);
    let rel = diff / scale;
    eprintln!("{name}: max |ours - onnxruntime| / max |onnxruntime| = {rel:.2e} (max abs {diff:.2e})");
    assert!(rel <= REL_TOL, "{name}: relative error {rel:e} > {REL_TOL:e}");
}

/// One call of `d` (the fixture `name`'s card) on the fixture's batch-2 inputs; `last`: the
/// plan is built by `prepare_final` (which proves a plan file's stand-ins) rather than `prepare`.
fn call(name: &str, card: &ModelCard, d: &mut Denoiser, last: bool) -> ndarray::Array4<f32> {
    let ins = inputs(name);
    let get = |n: &str| &ins.iter().find(|(i, _)| i == n).unwrap_or_else(|| panic!("{name}: no input {n}")).1;
    let names = &card.model.inputs;
    let sample = get(&names.sample).as_f32().into_dimensionality::<Ix4>().unwrap();
    let batch = sample.shape()[0];
    if last { d.prepare_final(batch) } else { d.prepare(batch) }.unwrap_or_else(|e| panic!("{name}: {e}"));
    let (TimeInput::Timestep(time) | TimeInput::Sigma(time)) = names.time();
    let timestep = get(time).as_f32().iter().next().copied().unwrap() as f64;
    let labels: Option<Vec<i64>> = names.class_labels.as_deref().map(|n| match get(n) {
        Input::I64(a) => a.iter().copied().collect(),
        Input::F32(_) => panic!("{name}: class labels stored as float"),
    });
    let context = names.encoder_hidden_states.as_deref().map(|n| get(n).as_f32());
    let extra: Vec<ArrayD<f32>> = d.conditioning_inputs().iter().map(|c| get(&c.input).as_f32()).collect();
    let conditions = Conditions { class_labels: labels.as_deref(), context: context.as_ref(), extra: &extra };
    let mut out = ndarray::Array4::<f32>::from_elem(sample.raw_dim(), f32::NAN);
    d.predict_with(&sample, timestep, &conditions, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));
    out
}

/// A copy of corpus model `name`'s folder, without plan files, in a fresh folder named by `tag`.
fn copy_without_plan_files(name: &str, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ed-corpus-{tag}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(folder(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_owned();
        if !file.to_string_lossy().ends_with(".edplan") {
            std::fs::copy(&path, dir.join(file)).unwrap();
        }
    }
    dir
}

/// A denoiser through a plan file (`Denoiser::load_with`), in a copy of its folder: the load
/// that writes the file, then one that leaves the covered initializers out of the ONNX file,
/// both bit-identical to the heap path.
fn through_plan_file(name: &str) {
    let dir = copy_without_plan_files(name, "plan");
    let card = ModelCard::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let heap = call(name, &card, &mut Denoiser::load(&card, 1).unwrap(), false);
    let plans = PlanCache::Dir(dir.join("plans"));
    for round in ["writing", "leaving weights out"] {
        let mut d = Denoiser::load_with(&card, 1, plans.clone(), WeightPrecision::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = call(name, &card, &mut d, true);
        let differing = out.iter().zip(heap.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{name}, {round} load: {differing} values differ from the heap path");
        let file = d.plan_file().clone();
        eprintln!("{name}, {round} load: {file:?}");
        match (round, file) {
            ("writing", PlanFile::Written { mapped, .. }) => {
                assert!(mapped, "{name}: the writing load kept its weights on the heap");
            }
            (_, PlanFile::Mapped { left_out, saved_graph, .. }) => {
                assert!(left_out > 0, "{name}: nothing left out");
                assert!(saved_graph, "{name}: the plan was not built from the graph the plan file holds");
            }
            (_, other) => panic!("{name}, {round} load: {other:?}"),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A denoiser through its card: `Denoiser::load` + `prepare` + `predict`.
fn denoiser(name: &str) {
    let card = ModelCard::load(folder(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut d = Denoiser::load(&card, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ins = inputs(name);
    let get = |n: &str| &ins.iter().find(|(i, _)| i == n).unwrap_or_else(|| panic!("{name}: no input {n}")).1;
    let names = &card.model.inputs;
    let sample = get(&names.sample).as_f32().into_dimensionality::<Ix4>().unwrap();
    let batch = sample.shape()[0];
    d.prepare(batch).unwrap_or_else(|e| panic!("{name}: {e}"));
    // A call takes one time for the batch: the fixtures give every image the same one.
    let (TimeInput::Timestep(time) | TimeInput::Sigma(time)) = names.time();
    let t = get(time).as_f32();
    assert!(t.iter().all(|&v| v == t.iter().next().copied().unwrap()), "{name}: one timestep per batch");
    let timestep = t.iter().next().copied().unwrap() as f64;
    let labels: Option<Vec<i64>> = names.class_labels.as_deref().map(|n| match get(n) {
        Input::I64(a) => a.iter().copied().collect(),
        Input::F32(_) => panic!("{name}: class labels stored as float"),
    });
    let context = names.encoder_hidden_states.as_deref().map(|n| get(n).as_f32());
    let extra: Vec<ArrayD<f32>> = d.conditioning_inputs().iter().map(|c| get(&c.input).as_f32()).collect();
    let conditions = Conditions { class_labels: labels.as_deref(), context: context.as_ref(), extra: &extra };
    let mut out = ndarray::Array4::<f32>::from_elem(sample.raw_dim(), f32::NAN);
    d.predict_with(&sample, timestep, &conditions, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: {} GroupNorms fused, {} convolutions on Winograd",
        d.fused_group_norms(),
        d.winograd_convolutions()
    );
    if name.starts_with("unet2d") {
        assert!(d.fused_group_norms() > 0 && d.winograd_convolutions() > 0, "{name}: our rewrites ran");
    }
    check(name, &out.into_dyn());
    // Batch 1, a size the export never traced (the symbol `batch` meets 1 everywhere): the
    // first image alone gives the first image of the batch-2 reference.
    let one = sample.slice(s![0..1, .., .., ..]).to_owned();
    let ctx1 = context.as_ref().map(|c| c.slice_axis(Axis(0), (0..1).into()).to_owned());
    let mut out1 = ndarray::Array4::<f32>::from_elem(one.raw_dim(), f32::NAN);
    let extra1: Vec<ArrayD<f32>> = extra.iter().map(|a| a.slice_axis(Axis(0), (0..1).into()).to_owned()).collect();
    let conditions1 =
        Conditions { class_labels: labels.as_ref().map(|l| &l[..1]), context: ctx1.as_ref(), extra: &extra1 };
    d.predict_with(&one, timestep, &conditions1, &mut out1).unwrap_or_else(|e| panic!("{name} batch 1: {e}"));
    let want = expected(name).slice_axis(Axis(0), (0..1).into()).to_owned();
    check_against(&format!("{name} batch 1"), &out1.into_dyn(), &want);
}

/// Any graph through `run_graph`.
fn graph(name: &str) {
    let values: Vec<ArrayD<f32>> = inputs(name).iter().map(|(_, v)| v.as_f32()).collect();
    let outs = run_graph(&folder(name).join("model.onnx"), &values, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
    check(name, &outs[0]);
}

#[test]
fn unet2d_legacy() {
    denoiser("unet2d_legacy");
}

#[test]
fn unet2d_dynamo() {
    denoiser("unet2d_dynamo");
}

#[test]
fn unet2d_cond_legacy() {
    denoiser("unet2d_cond_legacy");
}

#[test]
fn unet2d_cond_dynamo() {
    denoiser("unet2d_cond_dynamo");
}

/// The weights live in `model.onnx_data` beside `model.onnx`.
#[test]
fn unet2d_external() {
    denoiser("unet2d_external");
}

#[test]
fn consistency_edm() {
    denoiser("consistency_edm");
}

#[test]
fn dit_legacy() {
    denoiser("dit_legacy");
}

#[test]
fn sd3_dynamo() {
    denoiser("sd3_dynamo");
}

/// The plan file's load that leaves weights out, on every corpus denoiser: 3×3, 1×1 and strided
/// convolutions, external data, Einsum attention, and transformers made of linear layers.
#[test]
fn denoisers_through_a_plan_file() {
    let names = [
        "unet2d_legacy",
        "unet2d_dynamo",
        "unet2d_cond_legacy",
        "unet2d_cond_dynamo",
        "unet2d_external",
        "consistency_edm",
        "dit_legacy",
        "sd3_dynamo",
    ];
    for name in names {
        through_plan_file(name);
    }
}

/// A graph that is not a denoiser through a plan file (`Graph::load_with`), in a copy of its
/// folder: the load that writes the file, then one that builds from the graph the file saved,
/// both bit-identical to the heap path.
fn graph_through_plan_file(name: &str) {
    let dir = copy_without_plan_files(name, "graph-plan");
    let values: Vec<ArrayD<f32>> = inputs(name).iter().map(|(_, v)| v.as_f32()).collect();
    let shapes: Vec<Vec<usize>> = values.iter().map(|v| v.shape().to_vec()).collect();
    let onnx = dir.join("model.onnx");
    let heap = run_graph(&onnx, &values, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
    let plans = PlanCache::Dir(dir.join("plans"));
    for round in ["writing", "from the saved graph"] {
        let mut g = Graph::load_with(&onnx, &shapes, 1, plans.clone(), WeightPrecision::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = g.run(&values).unwrap_or_else(|e| panic!("{name}: {e}"));
        let differing = out[0].iter().zip(heap[0].iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{name}, {round} load: {differing} values differ from the heap path");
        match (round, g.plan_file().clone()) {
            ("writing", PlanFile::Written { mapped, .. }) => {
                assert!(mapped, "{name}: the writing load kept its weights on the heap");
            }
            (_, PlanFile::Mapped { left_out, saved_graph, .. }) => {
                assert!(left_out > 0, "{name}: nothing left out");
                assert!(saved_graph, "{name}: the graph was not built from the one the plan file holds");
            }
            (_, other) => panic!("{name}, {round} load: {other:?}"),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn decoders_through_a_plan_file() {
    for name in ["vae_decoder_legacy", "taesd_decoder_legacy"] {
        graph_through_plan_file(name);
    }
}

#[test]
fn vae_decoder_legacy() {
    graph("vae_decoder_legacy");
}

#[test]
fn taesd_decoder_legacy() {
    graph("taesd_decoder_legacy");
}
