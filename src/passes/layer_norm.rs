//! Layer normalization as one operator (the operator and why: `crate::ops::layer_norm`): finds
//! what tract makes of it, `RmsNorm(x − Σx · 1/n)` over the last axis, the sum and the
//! difference read by nothing else.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::math::{Div, Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use super::{bin_by_const, is_bin, single_use};
use crate::ops::layer_norm::LayerNorm;

/// Replaces every float32 layer normalization over the last axis (see the module docs) by a
/// [`LayerNorm`] node. Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some((x, eps)) = layer_norm_at(model, id)? else { continue };
        let node = model.node(id);
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, x)?;
        let y = patch.wire_node(format!("{}.layer_norm", node.name), LayerNorm { eps }, &[x])?[0];
        patch.shunt_outside(model, id.into(), y)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// At an `RmsNorm` node that normalizes a layer: its input x and epsilon.
fn layer_norm_at(model: &TypedModel, id: usize) -> TractResult<Option<(OutletId, f32)>> {
    let node = model.node(id);
    let Some(rms) = node.op_as::<RmsNorm>() else { return Ok(None) };
    let fact = model.outlet_fact(node.inputs[0])?;
    let rank = fact.rank();
    if fact.datum_type != f32::datum_type() || rank == 0 || rms.axis != rank - 1 || rms.eps.len() != 1 {
        return Ok(None);
    }
    let eps = rms.eps.cast_to_scalar::<f32>()?;
    let Some(n) = fact.shape[rank - 1].as_i64().filter(|&n| n > 0) else { return Ok(None) };
    // d = x − mean, read by the norm alone.
    let d = model.node(node.inputs[0].node);
    if !is_bin::<Sub>(d) || !single_use(model, node.inputs[0])? {
        return Ok(None);
    }
    let (x, mean) = (d.inputs[0], d.inputs[1]);
    if model.outlet_fact(x)?.shape != fact.shape {
        return Ok(None);
    }
    // mean = Σx · 1/n or Σx / n, over the last axis of the same x.
    let mean = model.node(mean.node);
    let (sum, factor) = if let Some((s, k)) = bin_by_const::<Mul>(model, mean)? {
        (s, k)
    } else if let Some((s, k)) = bin_by_const::<Div>(model, mean)?.filter(|(s, _)| *s == mean.inputs[0]) {
        (s, Arc::new(tensor0(1.0 / k.cast_to_scalar::<f32>()?)))
    } else {
        return Ok(None);
    };
    if factor.len() != 1 || !single_use(model, sum)? {
        return Ok(None);
    }
    let factor = factor.cast_to_scalar::<f32>()?;
    if (factor * n as f32 - 1.0).abs() > 1e-6 {
        return Ok(None);
    }
    let reduce = model.node(sum.node);
    let sums_x = reduce
        .op_as::<Reduce>()
        .is_some_and(|r| r.reducer == Reducer::Sum && *r.axes == [rank - 1] && reduce.inputs[0] == x);
    Ok(sums_x.then_some((x, eps)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::f32s;
    use tract_onnx::tract_core::ops::math::{mul, sub};

    /// tract's form of a layer norm over the last axis of `shape`, the mean taken as Σx ·
    /// `factor`.
    fn graph(shape: &[usize], factor: f32) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape))?;
        let rank = shape.len();
        let sum = model.wire_node("sum", Reduce::new(tvec![rank - 1], Reducer::Sum), &[x])?[0];
        let k = model.add_const("k", tensor0(factor).broadcast_into_rank(rank)?)?;
        let mean = model.wire_node("mean", mul(), &[sum, k])?[0];
        let d = model.wire_node("d", sub(), &[x, mean])?[0];
        let rms = RmsNorm { axis: rank - 1, eps: Arc::new(tensor0(1e-5f32)) };
        let y = model.wire_node("norm", rms, &[d])?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    #[test]
    fn replaces_the_chain_and_matches_tract() -> TractResult<()> {
        let shape = [2, 7, 40];
        let mut model = graph(&shape, 1.0 / 40.0)?;
        let n = shape.iter().product::<usize>();
        let input: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 40.0) / 7.0).collect();
        let input = tvec![Tensor::from_shape(&shape, &input)?.into_tvalue()];
        let want = model.clone().into_runnable()?.run(input.clone())?;
        assert_eq!(rewrite(&mut model)?, 1);
        let kinds: Vec<_> = model.eval_order()?.into_iter().map(|id| model.node(id).op.name()).collect();
        assert!(!kinds.iter().any(|k| k == "RmsNorm" || k == "Reduce<Sum>"), "{kinds:?}");
        let got = model.into_runnable()?.run(input)?;
        let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
        let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "max abs difference {worst}");
        Ok(())
    }

    #[test]
    fn leaves_a_mean_of_another_length_alone() -> TractResult<()> {
        // Σx · 1/39 over 40 values is not the mean.
        let mut model = graph(&[3, 40], 1.0 / 39.0)?;
        assert_eq!(rewrite(&mut model)?, 0);
        Ok(())
    }
}
