//! Layer normalization as one operator (the operator and why: `crate::ops::layer_norm`): finds
//! what tract makes of it, `RmsNorm(x − Σx · 1/n)` over the last axis, the sum and the
//! difference read by nothing else, and takes in a multiplication and then an addition after
//! it by operands of one value per column (constant or not).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::BinMiniOp;
use tract_onnx::tract_core::ops::math::{Add, Div, Mul, Sub};
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
        let mut last = OutletId::new(id, 0);
        let scale = columns_after::<Mul>(model, &mut last)?;
        let shift = columns_after::<Add>(model, &mut last)?;
        let mut patch = TypedModelPatch::default();
        let mut inputs = tvec![patch.tap_model(model, x)?];
        for operand in scale.iter().chain(&shift) {
            inputs.push(patch.tap_model(model, *operand)?);
        }
        let op = LayerNorm { eps, scale: scale.is_some(), shift: shift.is_some() };
        let y = patch.wire_node(format!("{}.layer_norm", node.name), op, &inputs)?[0];
        patch.shunt_outside(model, last, y)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// When the one reader of `*last` is a binary `O` with an operand of one value per column (see
/// [`LayerNorm::scale`]) that keeps `*last`'s shape: that operand, and `*last` moves to its
/// output.
fn columns_after<O: BinMiniOp>(model: &TypedModel, last: &mut OutletId) -> TractResult<Option<OutletId>> {
    if !single_use(model, *last)? {
        return Ok(None);
    }
    let next = model.node(model.outlet_successors(*last)[0].node);
    if !is_bin::<O>(next) || next.inputs.len() != 2 {
        return Ok(None);
    }
    let operand = if next.inputs[0] == *last { next.inputs[1] } else { next.inputs[0] };
    let (x, op, y) = (model.outlet_fact(*last)?, model.outlet_fact(operand)?, model.outlet_fact(next.id.into())?);
    let rank = x.rank();
    let fits = op.datum_type == f32::datum_type()
        && operand != *last
        && y.shape == x.shape
        && op.rank() == rank
        && op.shape[rank - 1] == x.shape[rank - 1]
        && (0..rank - 1).all(|a| op.shape[a].is_one() || op.shape[a] == x.shape[a]);
    if !fits {
        return Ok(None);
    }
    *last = next.id.into();
    Ok(Some(operand))
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
    use tract_onnx::tract_core::ops::math::{add, mul, sub};

    /// tract's form of a layer norm over the last axis of `shape`, the mean taken as Σx ·
    /// `factor`.
    fn graph(shape: &[usize], factor: f32) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape))?;
        let y = norm(&mut model, x, factor)?;
        model.select_output_outlets(&[y])?;
        Ok(model)
    }

    /// Wires tract's form of a layer norm of `x` over its last axis.
    fn norm(model: &mut TypedModel, x: OutletId, factor: f32) -> TractResult<OutletId> {
        let shape = model.outlet_fact(x)?.shape.clone();
        let rank = shape.len();
        let sum = model.wire_node("sum", Reduce::new(tvec![rank - 1], Reducer::Sum), &[x])?[0];
        let k = model.add_const("k", tensor0(factor).broadcast_into_rank(rank)?)?;
        let mean = model.wire_node("mean", mul(), &[sum, k])?[0];
        let d = model.wire_node("d", sub(), &[x, mean])?[0];
        let rms = RmsNorm { axis: rank - 1, eps: Arc::new(tensor0(1e-5f32)) };
        Ok(model.wire_node("norm", rms, &[d])?[0])
    }

    fn values(shape: &[usize], seed: usize) -> TractResult<Tensor> {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|i| ((i * 53 + seed * 31) % 97) as f32 / 13.0 - 3.0).collect();
        Tensor::from_shape(shape, &v)
    }

    fn worst(want: &TValue, got: &TValue) -> TractResult<f32> {
        let (want, got) = (f32s(want, "want")?, f32s(got, "got")?);
        Ok(want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max))
    }

    fn kinds(model: &TypedModel) -> TractResult<Vec<String>> {
        Ok(model.eval_order()?.into_iter().map(|id| model.node(id).op.name().to_string()).collect())
    }

    /// Rewrites `model` (one norm), checks that no node of the kinds `gone` is left, and that
    /// it gives tract's output on `input` within 1e-5.
    fn rewrites_to_tracts_output(mut model: TypedModel, input: TVec<TValue>, gone: &[&str]) -> TractResult<()> {
        let want = model.clone().into_runnable()?.run(input.clone())?;
        assert_eq!(rewrite(&mut model)?, 1);
        let kinds = kinds(&model)?;
        assert!(!kinds.iter().any(|k| gone.contains(&k.as_str())), "{kinds:?}");
        let got = model.into_runnable()?.run(input)?;
        let worst = worst(&want[0], &got[0])?;
        assert!(worst < 1e-5, "max abs difference {worst}");
        Ok(())
    }

    #[test]
    fn takes_in_a_per_image_modulation_and_matches_tract() -> TractResult<()> {
        // adaLN: norm(x) · m + shift, m one row per image (an input), shift a constant row.
        let (x_shape, m_shape, b_shape) = ([2, 5, 24], [2, 1, 24], [1, 1, 24]);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(x_shape))?;
        let m = model.add_source("m", f32::fact(m_shape))?;
        let y = norm(&mut model, x, 1.0 / 24.0)?;
        let y = model.wire_node("modulate", mul(), &[m, y])?[0];
        let b = model.add_const("shift", values(&b_shape, 2)?)?;
        let y = model.wire_node("shifted", add(), &[y, b])?;
        model.select_output_outlets(&y)?;
        let input = tvec![values(&x_shape, 0)?.into_tvalue(), values(&m_shape, 1)?.into_tvalue()];
        rewrites_to_tracts_output(model, input, &["Mul", "Add", "RmsNorm"])
    }

    #[test]
    fn leaves_an_operand_that_spreads_over_the_columns_alone() -> TractResult<()> {
        // One value per row (not per column) is no scale of the norm's kind.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([3, 16]))?;
        let m = model.add_source("m", f32::fact([3, 1]))?;
        let y = norm(&mut model, x, 1.0 / 16.0)?;
        let y = model.wire_node("scale", mul(), &[y, m])?;
        model.select_output_outlets(&y)?;
        assert_eq!(rewrite(&mut model)?, 1);
        assert!(kinds(&model)?.iter().any(|k| k == "Mul"));
        Ok(())
    }

    #[test]
    fn replaces_the_chain_and_matches_tract() -> TractResult<()> {
        let shape = [2, 7, 40];
        let model = graph(&shape, 1.0 / 40.0)?;
        let input = tvec![values(&shape, 0)?.into_tvalue()];
        rewrites_to_tracts_output(model, input, &["RmsNorm", "Reduce<Sum>"])
    }

    #[test]
    fn leaves_a_mean_of_another_length_alone() -> TractResult<()> {
        // Σx · 1/39 over 40 values is not the mean.
        let mut model = graph(&[3, 40], 1.0 / 39.0)?;
        assert_eq!(rewrite(&mut model)?, 0);
        Ok(())
    }
}
