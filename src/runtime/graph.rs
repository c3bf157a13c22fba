//! Graphs that are not denoisers (a text encoder, a VAE or TAESD decoder): loaded and rewritten
//! as a denoiser plan is, for fixed input shapes, then run as often as needed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::load::{decode, input_names, one_line, parse};
use super::memory::return_freed_memory;
use super::plan::{f32_rewrites, new_state, optimize, Exclusive};
use super::plan_file::{PlanFile, PlanStore, Proof};
use super::settings::{PlanCache, WeightPrecision};
use super::skeleton;
use super::symbols::set_inputs;
use super::threads::{executor_for, run_on};
use crate::error::{Error, Result};
use crate::ops::packed::{Held, Packer};

/// A graph built for one set of input shapes: optimized, with each input's element type and
/// shape, and (for the load that writes the plan file) the graph before tract's optimization.
struct Built {
    model: Arc<TypedModel>,
    inputs: Vec<(DatumType, Vec<usize>)>,
    rewritten: Option<TypedModel>,
}

/// `model` typed for inputs of `shapes`, rewritten with weights from `packer`, and optimized;
/// `keep`: also keep the rewritten graph, for the plan file.
fn build(mut model: InferenceModel, shapes: &[Vec<usize>], packer: &Packer, path: &Path, keep: bool) -> Result<Built> {
    let fail = |e: TractError| Error::Model { path: path.to_path_buf(), message: one_line(&format!("{e:#}")) };
    let names = input_names(&model);
    if names.len() != shapes.len() {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: format!("the graph takes {} inputs {names:?}, expected {}", names.len(), shapes.len()),
        });
    }
    let outlets = model.input_outlets().map_err(fail)?.to_vec();
    let mut inputs = vec![];
    let mut facts = vec![];
    for (ix, (shape, outlet)) in shapes.iter().zip(outlets).enumerate() {
        let dt = model.outlet_fact(outlet).map_err(fail)?.datum_type.concretize().unwrap_or(DatumType::F32);
        facts.push((ix, InferenceFact::dt_shape(dt, shape)));
        inputs.push((dt, shape.clone()));
    }
    set_inputs(&mut model, facts).map_err(fail)?;
    let typed = model.into_typed().map_err(fail)?;
    let (typed, _, _) = f32_rewrites(typed, true, packer).map_err(fail)?;
    let rewritten = keep.then(|| typed.clone());
    let model = Arc::new(optimize(typed).map_err(fail)?);
    Ok(Built { model, inputs, rewritten })
}

/// The rewritten graph a plan file saved (`crate::ops::serial`), its weights from `packer`,
/// optimized; `None` when it does not read back or does not take inputs of `shapes`.
fn from_saved(bytes: &[u8], shapes: &[Vec<usize>], packer: &Arc<Packer>) -> Option<Built> {
    let typed = crate::ops::serial::read(bytes, packer).ok()?;
    if typed.inputs.len() != shapes.len() {
        return None;
    }
    let mut inputs = vec![];
    for (i, shape) in shapes.iter().enumerate() {
        let fact = typed.input_fact(i).ok()?;
        if fact.shape.as_concrete()? != shape.as_slice() {
            return None;
        }
        inputs.push((fact.datum_type, shape.clone()));
    }
    let model = Arc::new(optimize(typed).ok()?);
    Some(Built { model, inputs, rewritten: None })
}

/// What [`prove`] established: the stand-ins' names, and the saved graph's bytes.
type Proven = (Vec<String>, Option<Vec<u8>>);

/// After the load that wrote the plan file: builds the graph again with the initializers of
/// `origins` as stand-ins and the weights packed this load, and runs one call on both, once
/// per pass of stand-ins filled with NaN ([`skeleton::PROOF_PASS_BYTES`] at a time). The
/// names of the stand-ins when the outputs agree bit for bit in every pass
/// (`super::skeleton`), and the rewritten graph as `crate::ops::serial` writes it when the
/// graph read back from those bytes gives the same outputs bit for bit too.
fn prove(
    path: &Path,
    shapes: &[Vec<usize>],
    built: &mut Built,
    held: Vec<Held>,
    origins: &HashSet<String>,
    executor: &Executor,
) -> Result<Option<Proven>> {
    let fail = |e: TractError| Error::Model { path: path.to_path_buf(), message: one_line(&format!("{e:#}")) };
    let names = skeleton::initializer_names(origins);
    let inputs = skeleton::probe_inputs(&built.model).map_err(fail)?;
    let mut ours = new_state(&built.model, executor).map_err(fail)?;
    let ours = run_on(executor, &mut ours, inputs.clone()).map_err(fail)?;
    let proven = skeleton::prove_in_passes(path, &names, |model| -> Result<bool> {
        let packer = Packer::over_held(held.clone());
        let proof = build(model, shapes, &packer, path, false)?;
        if packer.failed() {
            return Ok(false);
        }
        let mut theirs = new_state(&proof.model, executor).map_err(fail)?;
        let theirs = run_on(executor, &mut theirs, inputs.clone()).map_err(fail)?;
        Ok(skeleton::same_outputs(&ours, &theirs))
    })?;
    let Some(stand_ins) = proven else { return Ok(None) };
    let saved = Arc::new(Packer::over_held(held));
    let graph = built.rewritten.take().and_then(|r| crate::ops::serial::write(&r).ok()).filter(|bytes| {
        from_saved(bytes, shapes, &saved).is_some_and(|read_back| {
            let again = new_state(&read_back.model, executor).and_then(|mut s| run_on(executor, &mut s, inputs));
            again.is_ok_and(|outputs| skeleton::same_outputs(&ours, &outputs))
        })
    });
    Ok(Some((stand_ins, graph)))
}

/// An ONNX graph optimized for one set of input shapes, with its run state.
pub struct Graph {
    path: PathBuf,
    state: Exclusive<TypedSimpleState>,
    executor: Executor,
    /// Each input's element type in the graph and its shape.
    inputs: Vec<(DatumType, Vec<usize>)>,
    outputs: Vec<Vec<usize>>,
    /// Nodes of the optimized graph, for profiles.
    nodes: usize,
    plan_file: PlanFile,
}

impl Graph {
    /// Loads the ONNX file at `path` (external data from its folder) for inputs of `shapes`
    /// (one per graph input, in the graph's order), applies edge-diffuse's float32 rewrites and
    /// tract's optimization, and makes a run state on `threads` threads.
    pub fn load(path: &Path, shapes: &[Vec<usize>], threads: usize) -> Result<Self> {
        Self::load_with(path, shapes, threads, PlanCache::Off, WeightPrecision::F32)
    }

    /// [`Graph::load`], with the packed weights of its operators in a plan file as `plan_cache`
    /// says ([`Graph::plan_file`] tells what became of it), packed in `weights`' precision.
    /// As for a denoiser ([`Denoiser::load_with`](super::Denoiser::load_with)), the load that
    /// writes the plan file proves which initializers it covers, and later loads for the same
    /// shapes leave those out of the ONNX file.
    pub fn load_with(
        path: &Path,
        shapes: &[Vec<usize>],
        threads: usize,
        plan_cache: PlanCache,
        weights: WeightPrecision,
    ) -> Result<Self> {
        let fail = |e: TractError| Error::Model { path: path.to_path_buf(), message: one_line(&format!("{e:#}")) };
        let signature = format!("{shapes:?}");
        let plan_cache_on = plan_cache != PlanCache::Off;
        let (map, _, source) = skeleton::map_source(path)?;
        let mut plan_file = PlanStore::new(plan_cache, path, true, source);
        plan_file.set_weights(weights);
        let executor = executor_for(threads).1;
        let proof = plan_file.proof().filter(|p| p.builds.contains(&signature));
        if let Some(proof) = proof {
            let packer = plan_file.packer();
            if let Some(built) = plan_file.graph(&signature).and_then(|bytes| from_saved(bytes, shapes, &packer)) {
                // The whole graph came from the plan file: no byte of the ONNX graph was read.
                drop(map);
                plan_file.left_out = proof.stand_ins.len();
                plan_file.saved_graph = true;
                plan_file.after_build(signature);
                return Self::finish(path, built, executor, plan_file.status);
            }
            let names: HashSet<String> = proof.stand_ins.iter().cloned().collect();
            if let Some((model, _, left_out)) = skeleton::without(&map, path, &names, 0..0) {
                packer.by_key_alone(true);
                if let Ok(built) = build(model, shapes, &packer, path, false) {
                    if !packer.failed() {
                        drop(map);
                        plan_file.left_out = left_out.len();
                        plan_file.after_build(signature);
                        return Self::finish(path, built, executor, plan_file.status);
                    }
                }
            }
            // A weight the plan file lacks: read the whole file.
            plan_file.reset();
        }
        let proto = decode(&map, path)?;
        drop(map);
        let model = parse(&proto, path.parent()).map_err(fail)?;
        drop(proto);
        let mut built = build(model, shapes, &plan_file.packer(), path, plan_cache_on)?;
        plan_file.after_build(signature.clone());
        if let Some((held, origins, _)) = plan_file.to_prove() {
            if let Ok(Some((stand_ins, graph))) = prove(path, shapes, &mut built, held, &origins, &executor) {
                let graphs: Vec<(String, Vec<u8>)> = graph.map(|g| (signature.clone(), g)).into_iter().collect();
                plan_file.record(Proof { stand_ins, builds: vec![signature.clone()] }, &graphs);
            }
        }
        built.rewritten = None;
        // As a later load would: the graph the file saved, its weights read through the map,
        // so that the heap copies go.
        let saved =
            plan_file.map_written().and_then(|packer| from_saved(plan_file.graph(&signature)?, shapes, &packer));
        if let Some(saved) = saved {
            built = saved;
            plan_file.mark_mapped();
            return_freed_memory();
        }
        Self::finish(path, built, executor, plan_file.status)
    }

    fn finish(path: &Path, built: Built, executor: Executor, plan_file: PlanFile) -> Result<Self> {
        let fail = |e: TractError| Error::Model { path: path.to_path_buf(), message: one_line(&format!("{e:#}")) };
        let Built { model, inputs, .. } = built;
        let outputs = (0..model.output_outlets().map_err(fail)?.len())
            .map(|i| {
                let fact = model.output_fact(i).map_err(fail)?;
                fact.shape.as_concrete().map(|s| s.to_vec()).ok_or_else(|| Error::Model {
                    path: path.to_path_buf(),
                    message: format!(
                        "output {i} has no fixed shape for inputs {:?}",
                        inputs.iter().map(|i| &i.1).collect::<Vec<_>>()
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let state = new_state(&model, &executor).map_err(fail)?;
        let nodes = model.nodes().len();
        Ok(Graph {
            path: path.to_path_buf(),
            state: Exclusive::new(state),
            executor,
            inputs,
            outputs,
            nodes,
            plan_file,
        })
    }

    /// What became of the plan file of this graph's packed weights.
    pub fn plan_file(&self) -> &PlanFile {
        &self.plan_file
    }

    /// The shape of output `i` (in the graph's order).
    pub fn output_shape(&self, i: usize) -> &[usize] {
        &self.outputs[i]
    }

    /// Each input's element type in the graph, in the graph's order.
    pub fn input_types(&self) -> impl Iterator<Item = DatumType> + '_ {
        self.inputs.iter().map(|(dt, _)| *dt)
    }

    /// Runs the graph on `inputs` (float32, of the shapes it was loaded for; an input the graph
    /// declares as an integer or float64 tensor is cast to that type, so token ids given as
    /// floats feed an int32 `input_ids`). Returns every output as float32.
    pub fn run(&mut self, inputs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        let (executor, state, _, values) = self.parts(inputs)?;
        let fail = |e: TractError| Error::Inference(one_line(&format!("{e:#}")));
        let outputs = run_on(&executor, state, values).map_err(fail)?;
        outputs
            .iter()
            .map(|o| {
                let o = o.cast_to::<f32>().map_err(fail)?;
                Ok(o.to_plain_array_view::<f32>().map_err(fail)?.to_owned())
            })
            .collect::<Result<Vec<_>>>()
            .map_err(|e| match e {
                Error::Inference(m) => Error::Inference(format!("{}: {m}", self.path.display())),
                other => other,
            })
    }

    /// The executor, the run state, the node count and `inputs` as the graph's tensors.
    pub(super) fn parts(
        &mut self,
        inputs: &[ArrayD<f32>],
    ) -> Result<(Executor, &mut TypedSimpleState, usize, TVec<TValue>)> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|x| x.shape()).collect();
        let want: Vec<&[usize]> = self.inputs.iter().map(|(_, s)| s.as_slice()).collect();
        if shapes != want {
            return Err(Error::Inference(format!(
                "{}: inputs of shapes {shapes:?} given, the graph was loaded for {want:?}",
                self.path.display()
            )));
        }
        let fail =
            |e: TractError| Error::Inference(format!("{}: {}", self.path.display(), one_line(&format!("{e:#}"))));
        let mut values: TVec<TValue> = tvec![];
        for (x, (dt, _)) in inputs.iter().zip(&self.inputs) {
            let tensor = Tensor::from(x.clone()).cast_to_dt(*dt).map_err(fail)?.into_owned();
            values.push(tensor.into_tvalue());
        }
        Ok((self.executor.clone(), self.state.get_mut(), self.nodes, values))
    }
}

/// Loads the graph at `path` for `inputs`' shapes and runs it once ([`Graph`] for more calls).
/// Each call decodes and optimizes the graph anew.
pub fn run_graph(path: &Path, inputs: &[ArrayD<f32>], threads: usize) -> Result<Vec<ArrayD<f32>>> {
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|x| x.shape().to_vec()).collect();
    Graph::load(path, &shapes, threads)?.run(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test build proves in passes of a few stand-ins each: a decoder whose weights span
    /// several passes still gets every stand-in proven, and a later load that leaves them all
    /// out computes the same bits as the heap path.
    #[test]
    fn a_proof_in_several_passes_leaves_out_every_weight_it_covers() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus/vae_decoder_legacy");
        let dir = tempfile::tempdir().unwrap();
        let onnx = dir.path().join("model.onnx");
        std::fs::copy(fixture.join("model.onnx"), &onnx).unwrap();
        let latent: ndarray::ArrayD<f32> =
            ndarray_npy::read_npy(fixture.join("input_0_latent.npy")).expect("the fixture's latent");
        let shapes = [latent.shape().to_vec()];
        let heap = Graph::load(&onnx, &shapes, 1).unwrap().run(std::slice::from_ref(&latent)).unwrap();
        let plans = PlanCache::Dir(dir.path().join("plans"));

        let mut writing = Graph::load_with(&onnx, &shapes, 1, plans.clone(), WeightPrecision::F32).unwrap();
        // Once proven, the writing load too reads its weights through the file's map.
        let file = writing.plan_file();
        assert!(matches!(file, PlanFile::Written { mapped: true, .. }), "{file:?}");
        assert_eq!(writing.run(std::slice::from_ref(&latent)).unwrap(), heap);

        let mut mapped = Graph::load_with(&onnx, &shapes, 1, plans, WeightPrecision::F32).unwrap();
        let PlanFile::Mapped { left_out, .. } = mapped.plan_file().clone() else {
            panic!("second load: {:?}", mapped.plan_file())
        };
        let bytes = std::fs::read(&onnx).unwrap();
        let all: HashSet<String> = skeleton::scan(&bytes).unwrap().into_iter().map(|h| h.name).collect();
        let passes = skeleton::proof_passes(&bytes, &all, skeleton::PROOF_PASS_BYTES).unwrap();
        assert!(passes.len() > 2, "the fixture's weights fit in {} pass(es)", passes.len());
        assert!(left_out > passes.len(), "{left_out} initializers left out");
        let out = mapped.run(std::slice::from_ref(&latent)).unwrap();
        let bits = |v: &[ndarray::ArrayD<f32>]| v[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&heap));
    }
}
