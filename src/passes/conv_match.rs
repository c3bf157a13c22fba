//! What the convolution passes (`winograd`, `conv1x1`, `strided_conv`) share: which tract
//! convolutions our operators can take, and swapping them in.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::kernels::Window;
use crate::ops::f32s;
use crate::ops::packed::{Packer, Site};

/// A convolution one of our operators can run: `k` × `c` channels over an `h` × `w` map with
/// `window`, its OIHW weights, and its `k` biases, or `None` when the bias is computed (tract
/// folds a per-channel add after a convolution into its bias: diffusers' ResNet blocks add the
/// time embedding after `conv1`).
pub(crate) struct Found<'m> {
    pub k: usize,
    pub c: usize,
    // Only x86-64 picks an operator by map size (`winograd::direct_pays`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub map: [usize; 2],
    pub window: Window,
    /// The node's name: with the operator's kind, it keys the packed weights in a plan file.
    pub name: &'m str,
    /// The constant the weights are, when nothing else reads it ([`super::origin`]).
    pub origin: Option<&'m str>,
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
    let origin = super::origin(model, node.inputs[1]);
    Ok(Some(Found { k, c, map, window, name: &node.name, origin, kernel: f32s(kernel, op)?, bias }))
}

impl<'m> Found<'m> {
    /// The packed weights' site: this node, from `packer`.
    pub(crate) fn site<'p>(&'p self, packer: &'p Packer) -> Site<'p> {
        Site { packer, node: self.name, origin: self.origin }
    }
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
