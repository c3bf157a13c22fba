//! `x^2` and `x^3` as multiplications. tract evaluates a constant power (`PowConst`, what its
//! declutter makes of an exported `Pow` by a constant) with `powf` on every element, a library
//! call that costs tens of products; transformer exports raise to the third power in every
//! tanh-approximated GELU.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{mul, square, PowConst};

/// Replaces every float32 `PowConst` of exponent 2 by a square and of exponent 3 by `x · x²`.
/// Returns how many were replaced. Products round differently from `powf` by at most an ulp or
/// two, so only the exact-integer exponents are taken.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(exponent) =
            node.op_as::<ElementWiseOp>().and_then(|ew| ew.0.downcast_ref::<PowConst>()).map(|p| p.exponent)
        else {
            continue;
        };
        if model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
            continue;
        }
        let patch = match exponent {
            2.0 => TypedModelPatch::replace_single_op(model, node, &node.inputs, square())?,
            3.0 => {
                let mut patch = TypedModelPatch::default();
                let x = patch.tap_model(model, node.inputs[0])?;
                let x2 = patch.wire_node(format!("{}.square", node.name), square(), &[x])?[0];
                let x3 = patch.wire_node(format!("{}.cube", node.name), mul(), &[x, x2])?[0];
                patch.shunt_outside(model, id.into(), x3)?;
                patch
            }
            _ => continue,
        };
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::f32s;
    use tract_onnx::tract_core::ops::math::pow_const;

    #[test]
    fn squares_and_cubes_become_products_and_match_powf() -> TractResult<()> {
        let input: Vec<f32> = (0..64).map(|i| ((i * 37 % 61) as f32 - 30.0) / 7.0).collect();
        for (exponent, rewritten) in [(2.0, true), (3.0, true), (2.5, false), (0.5, false)] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([4, 16]))?;
            let y = model.wire_node("pow", pow_const(exponent), &[x])?;
            model.select_output_outlets(&y)?;
            let inputs = tvec![Tensor::from_shape(&[4, 16], &input)?.into_tvalue()];
            let want = model.clone().into_runnable()?.run(inputs.clone())?;
            assert_eq!(rewrite(&mut model)?, rewritten as usize, "exponent {exponent}");
            let got = model.into_runnable()?.run(inputs)?;
            for (a, b) in f32s(&want[0], "want")?.iter().zip(f32s(&got[0], "got")?) {
                let same = (a.is_nan() && b.is_nan()) || (a - b).abs() <= 2.0 * f32::EPSILON * a.abs();
                assert!(same, "exponent {exponent}: {a} vs {b}");
            }
        }
        Ok(())
    }
}
