//! Any ONNX graph run once, through the loader and float32 rewrites that denoiser plans take:
//! the way VAE and TAESD decoders and other graphs that are not denoisers run.

use std::path::Path;

use ndarray::ArrayD;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::load::{input_names, one_line, parse, read_proto};
use super::plan::{f32_rewrites, new_state, optimize};
use super::symbols::set_inputs;
use super::threads::{executor_for, run_on};
use crate::error::{Error, Result};

/// Loads the ONNX file at `path` (external data from its folder), fixes its input shapes to
/// those of `inputs` (one per graph input, in the graph's order), applies edge-diffuse's
/// float32 rewrites and tract's optimization as a denoiser plan does, and runs it once on
/// `threads` threads. Returns every graph output as float32.
///
/// An input the graph declares as an integer or float64 tensor is cast to that type, so a
/// timestep of `[417.0]` feeds an int64 `timestep`. Each call decodes and optimizes the graph
/// anew: fit for a decoder run once per image, not for a loop over steps (use
/// [`Denoiser`](super::Denoiser) for that).
pub fn run_graph(path: &Path, inputs: &[ArrayD<f32>], threads: usize) -> Result<Vec<ArrayD<f32>>> {
    let fail = |e: TractError| Error::Model { path: path.to_path_buf(), message: one_line(&format!("{e:#}")) };
    let proto = read_proto(path)?;
    let mut model = parse(&proto, path.parent()).map_err(fail)?;
    drop(proto);
    let names = input_names(&model);
    if names.len() != inputs.len() {
        return Err(Error::Inference(format!(
            "{}: the graph takes {} inputs {names:?}, {} given",
            path.display(),
            names.len(),
            inputs.len()
        )));
    }
    let outlets = model.input_outlets().map_err(fail)?.to_vec();
    let mut values: TVec<TValue> = tvec![];
    let mut facts = vec![];
    for (ix, (x, outlet)) in inputs.iter().zip(outlets).enumerate() {
        let declared = model.outlet_fact(outlet).map_err(fail)?.datum_type.concretize();
        let dt = declared.unwrap_or(DatumType::F32);
        let tensor = Tensor::from(x.clone()).cast_to_dt(dt).map_err(fail)?.into_owned();
        facts.push((ix, InferenceFact::dt_shape(dt, x.shape())));
        values.push(tensor.into_tvalue());
    }
    set_inputs(&mut model, facts).map_err(fail)?;
    let typed = model.into_typed().map_err(fail)?;
    let (typed, _, _) = f32_rewrites(typed, true).map_err(fail)?;
    let model = Arc::new(optimize(typed).map_err(fail)?);
    let executor = executor_for(threads).1;
    let mut state = new_state(&model, &executor).map_err(fail)?;
    let outputs = run_on(&executor, &mut state, values).map_err(|e| Error::Inference(one_line(&format!("{e:#}"))))?;
    outputs
        .iter()
        .map(|o| {
            let o = o.cast_to::<f32>().map_err(|e| Error::Inference(e.to_string()))?;
            Ok(o.to_plain_array_view::<f32>().map_err(|e| Error::Inference(e.to_string()))?.to_owned())
        })
        .collect()
}
