//! What our convolution operators (`winograd3x3`, `direct_conv`) share: reading the inputs of a
//! call, and the output fact.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::f32s;
use crate::kernels::Window;

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
