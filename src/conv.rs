//! What our convolution operators (`winograd`, `pointwise`) share: which tract convolutions
//! they can take, swapping them in, and reading the inputs of a call.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::winograd::f32s;

/// A convolution one of our operators can run: `k` × `c` channels over an `h` × `w` map, its
/// OIHW weights, and its `k` biases, or `None` when the bias is computed (tract folds a
/// per-channel add after a convolution into its bias: diffusers' ResNet blocks add the time
/// embedding after `conv1`).
struct Found<'m> {
    k: usize,
    c: usize,
    map: [usize; 2],
    kernel: &'m [f32],
    bias: Option<Vec<f32>>,
}

/// `node`, when it is a float32, `size`×`size`, stride-1, undilated, ungrouped NCHW convolution
/// padded by `pad` on every side, over an input of known non-empty shape, with constant weights
/// and a bias that is constant (`k` values or one for all) or computed (`k` values).
fn find<'m>(
    model: &'m TypedModel,
    node: &'m TypedNode,
    size: usize,
    pad: usize,
    op: &str,
) -> TractResult<Option<Found<'m>>> {
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let ones = |v: &Option<TVec<usize>>| v.iter().flatten().all(|&x| x == 1);
    let padded = match &spec.padding {
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, _) => {
            b.iter().chain(a.iter()).all(|&p| p == pad)
        }
        // A stride-1 "same" convolution with an odd kernel pads by half of it on each side.
        PaddingSpec::SameUpper | PaddingSpec::SameLower => 2 * pad + 1 == size,
        PaddingSpec::Valid => pad == 0,
    };
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || *spec.kernel_shape != [size, size]
        || !ones(&spec.strides)
        || !ones(&spec.dilations)
        || !padded
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let x = model.outlet_fact(node.inputs[0])?;
    let Some(kernel) = &model.outlet_fact(node.inputs[1])?.konst else { return Ok(None) };
    let bias = model.outlet_fact(node.inputs[2])?;
    let (k, c) = (conv.output_channels(), conv.input_channels());
    if x.datum_type != f32::datum_type()
        || x.rank() != 4
        || !x.shape.as_concrete().is_some_and(|s| s.iter().all(|&d| d > 0))
        || k == 0
        || c == 0
        || kernel.datum_type() != f32::datum_type()
        || kernel.shape() != [k, c, size, size]
        || bias.datum_type != f32::datum_type()
    {
        return Ok(None);
    }
    let bias = match &bias.konst {
        Some(b) if b.len() == k => Some(f32s(b, op)?.to_vec()),
        Some(b) if b.len() == 1 => Some(vec![f32s(b, op)?[0]; k]),
        None if bias.shape.as_concrete().is_some_and(|s| s.iter().product::<usize>() == k) => None,
        _ => return Ok(None),
    };
    let map = [x.shape[2].to_usize()?, x.shape[3].to_usize()?];
    Ok(Some(Found { k, c, map, kernel: f32s(kernel, op)?, bias }))
}

/// Replaces every convolution [`find`] accepts by `make(kernel, bias, k, c, [h, w])`, which takes the
/// convolution's input and, when the bias is computed, the bias as a second input. Returns how
/// many were replaced.
pub(crate) fn rewrite<O: Into<Box<dyn TypedOp>>>(
    model: &mut TypedModel,
    [size, pad]: [usize; 2],
    op: &str,
    make: impl Fn(&[f32], Option<&[f32]>, usize, usize, [usize; 2]) -> O,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(found) = find(model, node, size, pad, op)? else { continue };
        let new = make(found.kernel, found.bias.as_deref(), found.k, found.c, found.map);
        let inputs = if found.bias.is_some() { vec![node.inputs[0]] } else { vec![node.inputs[0], node.inputs[2]] };
        let patch = TypedModelPatch::replace_single_op(model, node, &inputs, new)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The input `[n, c, h, w]` and the `k` biases of a call to operator `op`: `bias` when it holds
/// them, else the second input.
pub(crate) fn call_inputs<'a>(
    op: &str,
    bias: &'a Option<Arc<Tensor>>,
    inputs: &'a [TValue],
    [c, k]: [usize; 2],
) -> TractResult<(&'a [f32], &'a [f32], [usize; 4])> {
    let (x, bias) = match (bias, inputs) {
        (Some(b), [x]) => (x, &**b),
        (None, [x, b]) => (x, &**b),
        _ => bail!("{op}: {} inputs, expected {}", inputs.len(), 2 - bias.is_some() as usize),
    };
    let &[n, xc, h, w] = x.shape() else { bail!("{op} expects NCHW, got {:?}", x.shape()) };
    ensure!(xc == c, "{op} expects {c} channels, got {xc}");
    let (xs, bias) = (f32s(x, op)?, f32s(bias, op)?);
    ensure!(bias.len() == k, "{op}: {} biases for {k} channels", bias.len());
    Ok((xs, bias, [n, c, h, w]))
}

/// The output fact of a convolution from `c` to `k` channels that keeps the map's size.
pub(crate) fn output_facts(inputs: &[&TypedFact], [c, k]: [usize; 2]) -> TractResult<TVec<TypedFact>> {
    let x = inputs[0];
    ensure!(x.rank() == 4 && x.shape[1] == c.to_dim());
    let shape = [x.shape[0].clone(), k.to_dim(), x.shape[2].clone(), x.shape[3].clone()];
    Ok(tvec!(f32::fact(shape)))
}
