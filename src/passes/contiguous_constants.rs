//! Natural strides for every constant of an optimized graph.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;

/// Gives every constant natural (C-order) strides.
///
/// Exporters store per-channel constants as `[C,1,1]`; tract broadcasts them to `[1,C,1,1]` by
/// inserting an axis, which leaves strides it then does not recognise as contiguous, and its
/// elementwise kernels fall back to a generic broadcasting loop for them, many times slower (the
/// GroupNorm affine and the time-embedding scale and shift, in every UNet).
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes().len() {
        let Some(konst) = model.node(id).op_as::<Const>() else { continue };
        let t = konst.val();
        if t.strides() == &*Tensor::natural_strides(t.shape()) {
            continue;
        }
        let fixed = (**t).clone().into_shape(t.shape())?;
        model.node_mut(id).op = Box::new(Const::new(Arc::new(fixed))?);
    }
    Ok(())
}
