//! Graphs that are not denoisers (a text encoder, a VAE or TAESD decoder): loaded and rewritten
//! as a denoiser plan is, for fixed input shapes, then run as often as needed.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::load::{input_names, one_line, parse, read_proto};
use super::plan::{f32_rewrites, new_state, optimize, Exclusive};
use super::plan_file::{PlanFile, PlanStore};
use super::settings::PlanCache;
use super::symbols::set_inputs;
use super::threads::{executor_for, run_on};
use crate::error::{Error, Result};

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
        Self::load_with(path, shapes, threads, PlanCache::Off)
    }

    /// [`Graph::load`], with the packed weights of its operators in a plan file as `plan_cache`
    /// says ([`Graph::plan_file`] tells what became of it).
    pub fn load_with(path: &Path, shapes: &[Vec<usize>], threads: usize, plan_cache: PlanCache) -> Result<Self> {
        let fail = |e: TractError| Error::Model { path: path.to_path_buf(), message: one_line(&format!("{e:#}")) };
        let (proto, source) = read_proto(path)?;
        let mut plan_file = PlanStore::new(plan_cache, path, true, source);
        let mut model = parse(&proto, path.parent()).map_err(fail)?;
        drop(proto);
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
        let (typed, _, _) = f32_rewrites(typed, true, &plan_file.packer()).map_err(fail)?;
        plan_file.after_build(format!("{shapes:?}"));
        let model = Arc::new(optimize(typed).map_err(fail)?);
        let outputs = (0..model.output_outlets().map_err(fail)?.len())
            .map(|i| {
                let fact = model.output_fact(i).map_err(fail)?;
                fact.shape.as_concrete().map(|s| s.to_vec()).ok_or_else(|| Error::Model {
                    path: path.to_path_buf(),
                    message: format!("output {i} has no fixed shape for inputs {shapes:?}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let executor = executor_for(threads).1;
        let state = new_state(&model, &executor).map_err(fail)?;
        let nodes = model.nodes().len();
        let plan_file = plan_file.status;
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
