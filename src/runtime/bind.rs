//! Binding the card's input names to the graph's inputs, and a call's values to tensors.

use ndarray::Array4;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModel};

use super::load::{input_names, one_line};
use super::Denoiser;
use crate::card::ModelCard;
use crate::error::{Error, Result};

/// How the timestep input is typed and shaped in the ONNX graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestepInput {
    /// Element type: float32, float64, int64 or int32.
    pub datum_type: DatumType,
    /// `[]`, `[1]` or `[batch]`.
    pub shape: TimestepShape,
}

/// The timestep's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepShape {
    /// A scalar.
    Scalar,
    /// One value for the whole batch.
    One,
    /// One value per image.
    Batch,
}

/// Which graph input takes what, and how the timestep is fed.
#[derive(Debug, Clone)]
pub(super) struct Bindings {
    pub(super) sample: usize,
    pub(super) timestep: usize,
    pub(super) timestep_input: TimestepInput,
    pub(super) class_labels: Option<(usize, DatumType)>,
    pub(super) context: Option<(usize, Vec<usize>)>,
    pub(super) output: usize,
}

pub(super) fn bind(model: &InferenceModel, card: &ModelCard) -> std::result::Result<Bindings, String> {
    let names = input_names(model);
    let cn = &card.model.inputs;
    let find = |field: &str, name: &str| {
        names.iter().position(|n| n == name).ok_or_else(|| {
            format!("the card's model.inputs.{field} = {name:?} is not an input of this ONNX graph (inputs: {names:?})")
        })
    };
    let sample = find("sample", &cn.sample)?;
    let timestep = find("timestep", &cn.timestep)?;
    let class_labels = cn.class_labels.as_deref().map(|n| find("class_labels", n)).transpose()?;
    let context = cn.encoder_hidden_states.as_deref().map(|n| find("encoder_hidden_states", n)).transpose()?;
    let bound: Vec<usize> = [Some(sample), Some(timestep), class_labels, context].into_iter().flatten().collect();
    if let Some(extra) = (0..names.len()).find(|i| !bound.contains(i)) {
        return Err(format!(
            "ONNX input {:?} is not named in the card's [model.inputs] (sample, timestep, class_labels, encoder_hidden_states)",
            names[extra]
        ));
    }
    let outlets = model.input_outlets().map_err(|e| e.to_string())?;
    let fact = |ix: usize| model.outlet_fact(outlets[ix]).map_err(|e| e.to_string());

    // The sample: float32, rank 4, and any concrete dims must agree with the card.
    let sf = fact(sample)?;
    if let Some(dt) = sf.datum_type.concretize() {
        if dt != f32::datum_type() {
            return Err(format!("input {:?} is {dt:?}, expected float32", cn.sample));
        }
    }
    let [c, h, w] = [card.image.channels, card.image.height, card.image.width];
    if let Some(rank) = sf.shape.rank().concretize() {
        if rank != 4 {
            return Err(format!("input {:?} has rank {rank}, expected 4 ([batch, C, H, W])", cn.sample));
        }
        for (axis, (want, what)) in [(1, (c, "image.channels")), (2, (h, "image.height")), (3, (w, "image.width"))] {
            if let Some(d) = sf.shape.dim(axis).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()) {
                if d != want as i64 {
                    return Err(format!(
                        "input {:?} has {d} at axis {axis}, but the card's {what} is {want}",
                        cn.sample
                    ));
                }
            }
        }
    }

    let tf = fact(timestep)?;
    let datum_type = match tf.datum_type.concretize() {
        None | Some(DatumType::F32) => DatumType::F32,
        Some(dt @ (DatumType::F64 | DatumType::I64 | DatumType::I32)) => dt,
        Some(other) => {
            return Err(format!(
                "timestep input {:?} is {other:?}, expected float32, float64, int64 or int32",
                cn.timestep
            ))
        }
    };
    let shape = match tf.shape.rank().concretize() {
        Some(0) => TimestepShape::Scalar,
        Some(1) => match tf.shape.dim(0).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()) {
            Some(1) => TimestepShape::One,
            _ => TimestepShape::Batch,
        },
        None => TimestepShape::Batch,
        Some(r) => return Err(format!("timestep input {:?} has rank {r}, expected [], [1] or [batch]", cn.timestep)),
    };

    let class_labels = match class_labels {
        Some(ix) => {
            let dt = fact(ix)?.datum_type.concretize().unwrap_or(DatumType::I64);
            if !matches!(dt, DatumType::I64 | DatumType::I32) {
                return Err(format!("class_labels input is {dt:?}, expected int64 or int32"));
            }
            Some((ix, dt))
        }
        None => None,
    };
    let context = match context {
        Some(ix) => {
            let f = fact(ix)?;
            let dims: Option<Vec<usize>> = (1..3)
                .map(|a| f.shape.dim(a).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()).map(|d| d as usize))
                .collect();
            let dims = dims.ok_or("encoder_hidden_states must have fixed [tokens, dim] in the ONNX file")?;
            Some((ix, dims))
        }
        None => None,
    };
    let outputs = model.output_outlets().map_err(|e| e.to_string())?;
    let output = match &card.model.output {
        None => 0,
        Some(name) => outputs
            .iter()
            .position(|&o| model.outlet_label(o) == Some(name.as_str()) || model.node(o.node).name == *name)
            .ok_or_else(|| format!("the card's model.output = {name:?} is not an output of this ONNX graph"))?,
    };
    Ok(Bindings {
        sample,
        timestep,
        timestep_input: TimestepInput { datum_type, shape },
        class_labels,
        context,
        output,
    })
}

impl Denoiser {
    /// The graph's inputs for one call, in tract's order and precision.
    pub(super) fn graph_inputs(
        &self,
        sample: &Array4<f32>,
        timestep: f64,
        class_labels: Option<&[i64]>,
        context: Option<&ndarray::ArrayD<f32>>,
    ) -> Result<TVec<TValue>> {
        let batch = sample.shape()[0];
        let b = &self.bindings;
        // One per graph input (`describe` lists them all), also once the source is released.
        let mut inputs: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        let float_dt = self.precision.float_type();
        // The f16 graph takes f16 floats: convert at the boundary so callers always see f32.
        let to_graph = |t: Tensor| -> Result<TValue> {
            let t = if t.datum_type() == f32::datum_type() && float_dt != t.datum_type() {
                t.cast_to_dt(float_dt).map_err(|e| Error::Inference(e.to_string()))?.into_owned()
            } else {
                t
            };
            Ok(t.into_tvalue())
        };
        let x = Tensor::from_shape(sample.shape(), sample.as_slice().expect("standard layout"))
            .map_err(|e| Error::Inference(e.to_string()))?;
        inputs[b.sample] = Some(to_graph(x)?);
        let n_t = match b.timestep_input.shape {
            TimestepShape::Scalar | TimestepShape::One => 1,
            TimestepShape::Batch => batch,
        };
        let t = timestep_tensor(b.timestep_input, timestep, n_t).map_err(|e| Error::Inference(e.to_string()))?;
        inputs[b.timestep] = Some(to_graph(t)?);
        if let Some((ix, dt)) = b.class_labels {
            let labels = class_labels.ok_or_else(|| Error::config("class", "this model needs a class label"))?;
            let t = tensor1(labels).cast_to_dt(dt).map_err(|e| Error::Inference(e.to_string()))?.into_owned();
            inputs[ix] = Some(t.into_tvalue());
        }
        if let Some((ix, _)) = &b.context {
            let ctx = context.ok_or_else(|| {
                Error::config("context", "this model takes encoder_hidden_states; pass a conditioning tensor")
            })?;
            inputs[*ix] = Some(to_graph(Tensor::from(ctx.clone()))?);
        }
        Ok(inputs.into_iter().map(|v| v.expect("every input bound")).collect())
    }
}

/// Copies a run's first output into `out` as f32.
pub(super) fn copy_output(outputs: TractResult<TVec<TValue>>, out: &mut Array4<f32>) -> Result<()> {
    let outputs = outputs.map_err(|e| Error::Inference(one_line(&format!("{e:#}"))))?;
    let out32 = outputs[0].cast_to::<f32>().map_err(|e| Error::Inference(e.to_string()))?;
    let view = out32.to_plain_array_view::<f32>().map_err(|e| Error::Inference(e.to_string()))?;
    out.assign(&view.into_dimensionality::<ndarray::Ix4>().map_err(|e| Error::Inference(e.to_string()))?);
    Ok(())
}

fn timestep_tensor(ti: TimestepInput, t: f64, n: usize) -> TractResult<Tensor> {
    // Integer-timestep models get the nearest integer (Euler/Heun produce fractional ones).
    let mut tensor = match ti.datum_type {
        DatumType::F64 => tensor1(&vec![t; n]),
        DatumType::I64 => tensor1(&vec![t.round() as i64; n]),
        DatumType::I32 => tensor1(&vec![t.round() as i32; n]),
        _ => tensor1(&vec![t as f32; n]),
    };
    if ti.shape == TimestepShape::Scalar {
        tensor = tensor.into_shape(&[])?;
    }
    Ok(tensor)
}
