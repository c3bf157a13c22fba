//! What our convolution operators (`winograd`, `pointwise`) share: which tract convolutions
//! they can take, swapping them in, and reading the inputs of a call.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::winograd::f32s;

/// Where a square convolution window goes over the map: its side, its stride (the same along
/// both axes), and the zeros padded before (top, left) and after (bottom, right) the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub size: usize,
    pub stride: usize,
    pub before: [usize; 2],
    pub after: [usize; 2],
}

impl Window {
    /// A `size` × `size` window at stride 1, padded by `pad` on every side.
    pub(crate) const fn square(size: usize, pad: usize) -> Self {
        Window { size, stride: 1, before: [pad; 2], after: [pad; 2] }
    }

    /// The output map over an `h` × `w` input, `None` when the window does not fit in the padded map.
    pub(crate) fn output(&self, [h, w]: [usize; 2]) -> Option<[usize; 2]> {
        let along = |len: usize, axis: usize| -> Option<usize> {
            let padded = len + self.before[axis] + self.after[axis];
            Some(padded.checked_sub(self.size)? / self.stride + 1)
        };
        Some([along(h, 0)?, along(w, 1)?])
    }
}

/// A convolution one of our operators can run: `k` × `c` channels over an `h` × `w` map with
/// `window`, its OIHW weights, and its `k` biases, or `None` when the bias is computed (tract
/// folds a per-channel add after a convolution into its bias: diffusers' ResNet blocks add the
/// time embedding after `conv1`).
pub(crate) struct Found<'m> {
    // Only x86-64 picks an operator by batch (`pointwise::rewrite_strided`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub n: usize,
    pub k: usize,
    pub c: usize,
    // Only x86-64 picks an operator by map size (`winograd::direct_pays`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub map: [usize; 2],
    pub window: Window,
    pub kernel: &'m [f32],
    pub bias: Option<Vec<f32>>,
}

/// `node`, when it is a float32, square, undilated, ungrouped NCHW convolution with the same
/// stride along both axes, over an input of known non-empty shape, with constant weights and a
/// bias that is constant (`k` values or one for all) or computed (`k` values).
fn find<'m>(model: &'m TypedModel, node: &'m TypedNode, op: &str) -> TractResult<Option<Found<'m>>> {
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let &[size, size_x] = &*spec.kernel_shape else { return Ok(None) };
    let stride = match spec.strides.as_deref() {
        None => 1,
        Some(&[sy, sx]) if sy == sx && sy > 0 => sy,
        Some(_) => return Ok(None),
    };
    let (before, after) = match &spec.padding {
        // Ceil mode (pooling's) would round the output size up, where `Window::output` rounds down.
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, false) if b.len() == 2 && a.len() == 2 => {
            ([b[0], b[1]], [a[0], a[1]])
        }
        // A stride-1 "same" convolution with an odd kernel pads by half of it on each side.
        PaddingSpec::SameUpper | PaddingSpec::SameLower if stride == 1 && size % 2 == 1 => {
            ([size / 2; 2], [size / 2; 2])
        }
        PaddingSpec::Valid => ([0; 2], [0; 2]),
        _ => return Ok(None),
    };
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || size != size_x
        || size == 0
        || !spec.dilations.iter().flatten().all(|&d| d == 1)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let window = Window { size, stride, before, after };
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
    let (n, map) = (x.shape[0].to_usize()?, [x.shape[2].to_usize()?, x.shape[3].to_usize()?]);
    // tract's own output shape must agree with the window's (a safeguard for padding modes).
    let Some([oh, ow]) = window.output(map) else { return Ok(None) };
    let y = model.outlet_fact(OutletId::new(node.id, 0))?;
    if y.shape.as_concrete() != Some(&[n, k, oh, ow][..]) {
        return Ok(None);
    }
    let bias = match &bias.konst {
        Some(b) if b.len() == k => Some(f32s(b, op)?.to_vec()),
        Some(b) if b.len() == 1 => Some(vec![f32s(b, op)?[0]; k]),
        None if bias.shape.as_concrete().is_some_and(|s| s.iter().product::<usize>() == k) => None,
        _ => return Ok(None),
    };
    Ok(Some(Found { n, k, c, map, window, kernel: f32s(kernel, op)?, bias }))
}

/// Replaces every convolution [`find`] accepts by the operator `make` returns for it, if any,
/// which takes the convolution's input and, when the bias is computed, the bias as a second
/// input. Returns how many were replaced.
pub(crate) fn rewrite(
    model: &mut TypedModel,
    op: &str,
    make: impl Fn(&Found) -> Option<Box<dyn TypedOp>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(found) = find(model, node, op)? else { continue };
        let Some(new) = make(&found) else { continue };
        let inputs = if found.bias.is_some() { vec![node.inputs[0]] } else { vec![node.inputs[0], node.inputs[2]] };
        let kernel = node.inputs[1];
        let patch = TypedModelPatch::replace_single_op(model, node, &inputs, new)?;
        patch.apply(model)?;
        empty_if_unread(model, kernel)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// Empties the constant at `outlet` once nothing reads it any more (`compact` then drops the
/// node). Why: when the graph holds the only reference to a kernel (a plan built from the source
/// graph itself, `Denoiser::prepare_final`), each kernel is freed as soon as its replacement has
/// its own copy, so the build never holds all the kernels and all their copies at once.
fn empty_if_unread(model: &mut TypedModel, outlet: OutletId) -> TractResult<()> {
    let node = model.node(outlet.node);
    if node.op_as::<Const>().is_none()
        || node.outputs.iter().any(|o| !o.successors.is_empty())
        || model.output_outlets()?.contains(&outlet)
    {
        return Ok(());
    }
    let empty = Arc::new(Tensor::zero::<f32>(&[0])?);
    let node = model.node_mut(outlet.node);
    node.outputs[0].fact = TypedFact::try_from(empty.clone())?;
    node.op = Box::new(Const::new(empty)?);
    Ok(())
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

/// The output fact of a convolution from `c` to `k` channels with `window`.
pub(crate) fn output_facts(inputs: &[&TypedFact], [c, k]: [usize; 2], window: Window) -> TractResult<TVec<TypedFact>> {
    let x = inputs[0];
    ensure!(x.rank() == 4 && x.shape[1] == c.to_dim());
    // A window that keeps the map's size keeps its dimensions as they are (symbolic or not).
    let keeps = (0..2).all(|a| window.stride == 1 && window.before[a] + window.after[a] + 1 == window.size);
    let map = if keeps {
        [x.shape[2].clone(), x.shape[3].clone()]
    } else {
        let map = [x.shape[2].to_usize()?, x.shape[3].to_usize()?];
        let Some([oh, ow]) = window.output(map) else { bail!("a {window:?} window does not fit a {map:?} map") };
        [oh.to_dim(), ow.to_dim()]
    };
    let [oh, ow] = map;
    Ok(tvec!(f32::fact([x.shape[0].clone(), k.to_dim(), oh, ow])))
}
