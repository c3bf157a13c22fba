//! Binding the card's input names to the graph's inputs, and a call's values to tensors.

use ndarray::Array4;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModel};

use super::load::{input_names, one_line};
use super::Denoiser;
use crate::card::{ModelCard, TimeInput};
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
    /// The input's index and its `[tokens, dim]`, where the file fixes them (an optimum export
    /// leaves `tokens` symbolic: [`Denoiser::set_context_shape`] gives it).
    pub(super) context: Option<(usize, [Option<usize>; 2])>,
    pub(super) conditioning: Vec<ConditioningInput>,
    pub(super) output: usize,
}

/// A graph input bound by a `[model.conditioning.NAME]` table of the card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditioningInput {
    /// The card table's name.
    pub name: String,
    /// The graph input's name.
    pub input: String,
    /// Its element type in the graph (values are given as float32 and converted).
    pub datum_type: DatumType,
    /// One image's shape: the input's dims after the batch axis (`[]` for one number per image).
    pub dims: Vec<usize>,
    pub(super) index: usize,
}

/// A call's inputs beyond the sample and the time, for a batch of images.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions<'a> {
    /// One class label per image (class-conditional models).
    pub class_labels: Option<&'a [i64]>,
    /// Cross-attention conditioning, `[batch, tokens, dim]`.
    pub context: Option<&'a ndarray::ArrayD<f32>>,
    /// The values of the card's conditioning inputs, in
    /// [`conditioning_inputs`](Denoiser::conditioning_inputs) order, each `[batch, ...dims]`.
    pub extra: &'a [ndarray::ArrayD<f32>],
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
    let (time_field, time_name) = match cn.time() {
        TimeInput::Timestep(name) => ("timestep", name),
        TimeInput::Sigma(name) => ("sigma", name),
    };
    let timestep = find(time_field, time_name)?;
    let class_labels = cn.class_labels.as_deref().map(|n| find("class_labels", n)).transpose()?;
    let context = cn.encoder_hidden_states.as_deref().map(|n| find("encoder_hidden_states", n)).transpose()?;
    let mut conditioning = Vec::new();
    for (table, c) in &card.model.conditioning {
        let input = c.input_name(table);
        let index = names.iter().position(|n| n == input).ok_or_else(|| {
            format!(
                "the card's [model.conditioning.{table}] binds input {input:?}, which is not an input of this ONNX graph (inputs: {names:?})"
            )
        })?;
        conditioning.push((table.clone(), input.to_string(), index));
    }
    let bound: Vec<usize> = [Some(sample), Some(timestep), class_labels, context]
        .into_iter()
        .flatten()
        .chain(conditioning.iter().map(|c| c.2))
        .collect();
    if let Some(extra) = (0..names.len()).find(|i| !bound.contains(i)) {
        let name = &names[extra];
        return Err(format!(
            "ONNX input {name:?} is bound to nothing: name it in the card's [model.inputs] (sample, timestep or sigma, class_labels, encoder_hidden_states), or add a [model.conditioning.{name}] table with a default (a number, a list or a .npy file)"
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
    let [c, h, w] = [card.sample_channels(), card.image.height, card.image.width];
    let channels = match card.model.inpainting {
        true => "image.channels × 2 + 1 (an inpainting model's sample, mask and masked init)",
        false => "image.channels",
    };
    if let Some(rank) = sf.shape.rank().concretize() {
        if rank != 4 {
            return Err(format!("input {:?} has rank {rank}, expected 4 ([batch, C, H, W])", cn.sample));
        }
        for (axis, (want, what)) in [(1, (c, channels)), (2, (h, "image.height")), (3, (w, "image.width"))] {
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
    let datum_type = match (tf.datum_type.concretize(), time_field) {
        (None | Some(DatumType::F32), _) => DatumType::F32,
        (Some(dt @ DatumType::F64), _) => dt,
        (Some(dt @ (DatumType::I64 | DatumType::I32)), "timestep") => dt,
        (Some(other), "timestep") => {
            return Err(format!("timestep input {time_name:?} is {other:?}, expected float32, float64, int64 or int32"))
        }
        (Some(other), _) => return Err(format!("sigma input {time_name:?} is {other:?}, expected float32 or float64")),
    };
    let shape = match tf.shape.rank().concretize() {
        Some(0) => TimestepShape::Scalar,
        Some(1) => match tf.shape.dim(0).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()) {
            Some(1) => TimestepShape::One,
            _ => TimestepShape::Batch,
        },
        None => TimestepShape::Batch,
        Some(r) => return Err(format!("{time_field} input {time_name:?} has rank {r}, expected [], [1] or [batch]")),
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
            if f.shape.rank().concretize().is_some_and(|r| r != 3) {
                return Err(format!(
                    "encoder_hidden_states has rank {:?}, expected [batch, tokens, dim]",
                    f.shape.rank()
                ));
            }
            let dim = |a| f.shape.dim(a).and_then(|d| d.concretize()).and_then(|d| d.to_i64().ok()).map(|d| d as usize);
            Some((ix, [dim(1), dim(2)]))
        }
        None => None,
    };
    let conditioning = conditioning
        .into_iter()
        .map(|(name, input, index)| {
            let f = fact(index)?;
            let datum_type = match f.datum_type.concretize() {
                None => DatumType::F32,
                Some(dt @ (DatumType::F32 | DatumType::F16 | DatumType::F64 | DatumType::I64 | DatumType::I32)) => dt,
                Some(other) => {
                    return Err(format!(
                        "conditioning input {input:?} is {other:?}, expected a float or int32/int64 type"
                    ))
                }
            };
            let rank = f.shape.rank().concretize().ok_or_else(|| {
                format!("conditioning input {input:?} has no known rank in the ONNX file, expected [batch, ...]")
            })?;
            if rank < 1 {
                return Err(format!("conditioning input {input:?} is a scalar, expected a batch axis: [batch, ...]"));
            }
            let dims = (1..rank as usize)
                .map(|a| {
                    f.shape
                        .dim(a)
                        .and_then(|d| d.concretize())
                        .and_then(|d| d.to_i64().ok())
                        .map(|d| d as usize)
                        .ok_or_else(|| {
                            format!("conditioning input {input:?} has no fixed size at axis {a} in the ONNX file")
                        })
                })
                .collect::<std::result::Result<Vec<usize>, String>>()?;
            Ok(ConditioningInput { name, input, datum_type, dims, index })
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
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
        conditioning,
        output,
    })
}

impl Denoiser {
    /// The graph's inputs for one call, in tract's order and precision.
    pub(super) fn graph_inputs(&self, sample: &Array4<f32>, timestep: f64, cond: &Conditions) -> Result<TVec<TValue>> {
        let Conditions { class_labels, context, extra } = *cond;
        let batch = sample.shape()[0];
        let b = &self.bindings;
        // One per graph input (`describe` lists them all), also once the source is released.
        let mut inputs: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        let float_dt = self.graph_float();
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
        if extra.len() != b.conditioning.len() {
            return Err(Error::config(
                "conditioning",
                format!("this model takes {} conditioning inputs, got {} values", b.conditioning.len(), extra.len()),
            ));
        }
        for (c, value) in b.conditioning.iter().zip(extra) {
            let want: Vec<usize> = std::iter::once(batch).chain(c.dims.iter().copied()).collect();
            if value.shape() != want.as_slice() {
                return Err(Error::Tensor {
                    what: format!("conditioning {}", c.name),
                    message: format!("expected shape {want:?}, found {:?}", value.shape()),
                });
            }
            let t = Tensor::from(value.clone());
            let t = match c.datum_type {
                DatumType::F32 => to_graph(t)?,
                dt => t.cast_to_dt(dt).map_err(|e| Error::Inference(e.to_string()))?.into_owned().into_tvalue(),
            };
            inputs[c.index] = Some(t);
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
