//! A one-input `Einsum` that only reorders axes (`nhwpqc->nchpwq`, how diffusers' DiT and SD3
//! transformers turn patches back into an image) as tract axis moves.
//!
//! Why: tract keeps such an `EinSum` and evaluates it element by element through its general
//! summing loop, which made it the slowest node of a small transformer's call; a move is a
//! strided copy, and tract's optimizer can fold it into its neighbours.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Replaces every one-input `EinSum` in which each axis appears once in the input and once in
/// the output by the axis moves of that permutation. Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<EinSum>() else { continue };
        let input = model.outlet_fact(node.inputs[0])?;
        let permutation = op.q_params.is_none()
            && node.inputs.len() == 1
            && op.axes.input_count() == 1
            && op.axes.output_count() == 1
            && model.outlet_fact(node.inputs[0])?.datum_type == op.operating_dt
            && op.axes.iter_all_axes().all(|a| match (a.inputs[0].len(), a.outputs[0].len()) {
                (1, 1) | (0, 1) => true,
                // An axis summed over is a permutation's only when it has one element.
                (1, 0) => input.shape[a.inputs[0][0]].is_one(),
                _ => false,
            });
        if !permutation {
            continue;
        }
        let moves = op.axes.translate_to_axis_ops()?;
        let mut patch = TypedModelPatch::default();
        let mut x = patch.tap_model(model, node.inputs[0])?;
        for (i, mv) in moves.into_iter().enumerate() {
            x = patch.wire_node(format!("{}.move{i}", node.name), mv, &[x])?[0];
        }
        patch.shunt_outside(model, id.into(), x)?;
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
    fn a_pure_permutation_becomes_moves_with_the_same_values() -> TractResult<()> {
        for (equation, shape, rewritten) in [
            ("nhwpqc->nchpwq", [1usize, 3, 4, 2, 2, 5], true),
            ("abcdef->fedcba", [2, 1, 3, 2, 2, 3], true),
            ("abcdef->abcdf", [2, 1, 3, 2, 2, 3], false),
        ] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(shape))?;
            let y = model.wire_node("einsum", EinSum::new(equation.parse()?, f32::datum_type()), &[x])?;
            model.select_output_outlets(&y)?;
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let inputs = tvec![Tensor::from_shape(&shape, &values)?.into_tvalue()];
            let want = model.clone().into_runnable()?.run(inputs.clone())?;
            assert_eq!(rewrite(&mut model)?, rewritten as usize, "{equation}");
            let got = model.into_runnable()?.run(inputs)?;
            assert_eq!(want[0].shape(), got[0].shape(), "{equation}");
            assert_eq!(f32s(&want[0], "want")?, f32s(&got[0], "got")?, "{equation}");
        }
        Ok(())
    }
}
