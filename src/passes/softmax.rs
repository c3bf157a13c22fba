//! Softmax over the last axis on our row kernel (the operator and why: `crate::ops::softmax`).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use crate::kernels::softmax_available;
use crate::ops::softmax::RowSoftmax;

/// Replaces every float32 softmax over the last axis of a tensor of known shape by a
/// [`RowSoftmax`] node, when this CPU runs the kernel. Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !softmax_available() {
        return Ok(0);
    }
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(softmax) = node.op_as::<Softmax>() else { continue };
        let x = model.outlet_fact(node.inputs[0])?;
        let rank = x.rank();
        let row = x.shape.as_concrete().and_then(|s| s.last().copied());
        if softmax.kind != SoftmaxKind::Softmax
            || x.datum_type != f32::datum_type()
            || rank == 0
            || *softmax.axes != [rank - 1]
            || row.is_none_or(|r| r == 0)
        {
            continue;
        }
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, RowSoftmax)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::f32s;

    #[test]
    fn replaces_a_last_axis_softmax_and_matches_tract() -> TractResult<()> {
        if !softmax_available() {
            return Ok(());
        }
        let shape = [4, 6, 20];
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape))?;
        let y = model.wire_node("softmax", Softmax::new(tvec![2], None, SoftmaxKind::Softmax), &[x])?;
        model.select_output_outlets(&y)?;
        let mut other_axis = model.clone();
        let input: Vec<f32> = (0..480).map(|i| ((i * 53 % 97) as f32 - 48.0) / 7.0).collect();
        let input = tvec![Tensor::from_shape(&shape, &input)?.into_tvalue()];
        let want = model.clone().into_runnable()?.run(input.clone())?;
        assert_eq!(rewrite(&mut model)?, 1);
        let got = model.into_runnable()?.run(input)?;
        let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
        let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "max abs difference {worst}");
        // Not the last axis: left to tract.
        let id = other_axis.node_by_name("softmax")?.id;
        other_axis.node_mut(id).op = Box::new(Softmax::new(tvec![1], None, SoftmaxKind::Softmax));
        assert_eq!(rewrite(&mut other_axis)?, 0);
        Ok(())
    }
}
