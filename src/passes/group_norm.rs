//! GroupNorm and its affine (and a SiLU right after) as one operator: finds the pattern
//! PyTorch's export becomes in a decluttered graph (the operator and why:
//! `crate::ops::group_norm`).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm, Silu};

use super::{bin_by_const, is_bin};
use crate::ops::group_norm::GroupNorm;

/// Replaces every GroupNorm pattern (see the module docs) over a float32 `[n, c, h, w]` tensor
/// with constant γ and β, and the SiLU that follows it if any, by a [`GroupNorm`] node.
/// Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(found) = pattern_at(model, id)? else { continue };
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(model, found.input)?;
        let name = model.node(found.output.node).name.clone();
        let out = patch.wire_node(name, found.op, &[tap])?[0];
        patch.shunt_outside(model, found.output, out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

struct Found {
    input: OutletId,
    output: OutletId,
    op: GroupNorm,
}

/// The pattern around the `RmsNorm` node `id`, if it is one.
fn pattern_at(model: &TypedModel, id: usize) -> TractResult<Option<Found>> {
    let node = model.node(id);
    let Some(rms) = node.op_as::<RmsNorm>() else { return Ok(None) };
    // RmsNorm over the last axis of [n, groups, L], of x − mean.
    let sub = model.node(node.inputs[0].node);
    if rms.axis != 2 || model.outlet_fact(node.inputs[0])?.rank() != 3 || !is_bin::<Sub>(sub) {
        return Ok(None);
    }
    let (grouped, mean) = (sub.inputs[0], model.node(sub.inputs[1].node));
    let Some(recip) = bin_by_const::<Mul>(model, mean)? else { return Ok(None) };
    let sum = model.node(recip.0.node);
    let is_sum = sum.op_as::<Reduce>().is_some_and(|r| r.reducer == Reducer::Sum && *r.axes == [2]);
    if !is_sum || sum.inputs[0] != grouped {
        return Ok(None);
    }
    let reshape = model.node(grouped.node);
    if !matches!(reshape.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))) {
        return Ok(None);
    }
    let input = reshape.inputs[0];
    let x = model.outlet_fact(input)?;
    let grouped_fact = model.outlet_fact(grouped)?;
    let (Some(shape), Some(gshape)) = (x.shape.as_concrete(), grouped_fact.shape.as_concrete()) else {
        return Ok(None);
    };
    let &[n, c, h, w] = shape else { return Ok(None) };
    let groups = gshape[1];
    if x.datum_type != f32::datum_type() || gshape != [n, groups, c / groups * h * w] || c % groups != 0 {
        return Ok(None);
    }
    // Back to [n, c, h, w], then · γ + β with one value per channel.
    let Some(back) = model.single_succ(id)? else { return Ok(None) };
    let back_shape = model.outlet_fact(OutletId::new(back.id, 0))?.shape.as_concrete().map(|s| s.to_vec());
    if !matches!(back.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))) || back_shape.as_deref() != Some(shape) {
        return Ok(None);
    }
    let Some(scale) = model.single_succ(back.id)? else { return Ok(None) };
    let Some((_, gamma)) = bin_by_const::<Mul>(model, scale)? else { return Ok(None) };
    let Some(shift) = model.single_succ(scale.id)? else { return Ok(None) };
    let Some((_, beta)) = bin_by_const::<Add>(model, shift)? else { return Ok(None) };
    // The intermediate results must feed nothing else.
    let outputs = model.output_outlets()?;
    let only =
        |outlet: OutletId, uses: usize| model.outlet_successors(outlet).len() == uses && !outputs.contains(&outlet);
    let sole_uses = only(grouped, 2)
        && only(OutletId::new(sum.id, 0), 1)
        && only(OutletId::new(mean.id, 0), 1)
        && only(OutletId::new(sub.id, 0), 1)
        && only(OutletId::new(id, 0), 1)
        && only(OutletId::new(back.id, 0), 1)
        && only(OutletId::new(scale.id, 0), 1);
    let per_channel =
        |t: &Tensor| t.datum_type() == f32::datum_type() && t.len() == c && channel_axis_only(t.shape(), c);
    let scalar = |t: &Tensor| t.datum_type() == f32::datum_type() && t.len() == 1;
    if !sole_uses || !per_channel(&gamma) || !per_channel(&beta) || !scalar(&recip.1) {
        return Ok(None);
    }
    let (Ok(recip), Ok(eps)) = (recip.1.cast_to_scalar::<f32>(), rms.eps.cast_to_scalar::<f32>()) else {
        return Ok(None);
    };
    // A SiLU that alone reads the result joins the operator.
    let shifted = OutletId::new(shift.id, 0);
    let silu = model
        .single_succ(shift.id)?
        .filter(|next| only(shifted, 1) && next.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<Silu>()));
    let op = GroupNorm {
        groups,
        recip,
        eps,
        gamma: gamma.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        beta: beta.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        silu: silu.is_some(),
    };
    let output = silu.map_or(shifted, |node| OutletId::new(node.id, 0));
    Ok(Some(Found { input, output, op }))
}

/// Whether `shape` (of a tensor of `c` elements) broadcasts along the channel axis of
/// `[n, c, h, w]`: `[c]`-like shapes right-aligned against it, `[1, c, 1, 1]` or `[c, 1, 1]`.
fn channel_axis_only(shape: &[usize], c: usize) -> bool {
    let padded: Vec<usize> =
        std::iter::repeat_n(1, 4usize.saturating_sub(shape.len())).chain(shape.iter().copied()).collect();
    padded.len() == 4 && padded[1] == c && padded[0] == 1 && padded[2] == 1 && padded[3] == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GroupNorm graph in the shape the ONNX importer and tract's declutter produce from
    /// PyTorch's export, run as is and rewritten.
    fn graph(n: usize, c: usize, groups: usize, hw: [usize; 2]) -> TractResult<TypedModel> {
        let [h, w] = hw;
        let len = c / groups * h * w;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([n, c, h, w]))?;
        let grouped = model.wire_node(
            "reshape",
            AxisOp::Reshape(1, tvec![c.to_dim(), h.to_dim(), w.to_dim()], tvec![groups.to_dim(), len.to_dim()]),
            &[x],
        )?[0];
        let sum = model.wire_node("sum", Reduce { axes: tvec![2], reducer: Reducer::Sum }, &[grouped])?[0];
        let recip = model.add_const("recip", tensor3(&[[[1.0 / len as f32]]]))?;
        let mean = model.wire_node("mean", tract_onnx::tract_core::ops::math::mul(), &[sum, recip])?[0];
        let diff = model.wire_node("diff", tract_onnx::tract_core::ops::math::sub(), &[grouped, mean])?[0];
        let normed = model.wire_node("rms", RmsNorm { axis: 2, eps: rctensor0(1e-5f32) }, &[diff])?[0];
        let back = model.wire_node(
            "back",
            AxisOp::Reshape(1, tvec![groups.to_dim(), len.to_dim()], tvec![c.to_dim(), h.to_dim(), w.to_dim()]),
            &[normed],
        )?[0];
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 / c as f32).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 * 0.1 - 0.3).collect();
        let gamma = model.add_const("gamma", Tensor::from_shape(&[1, c, 1, 1], &gamma)?)?;
        let beta = model.add_const("beta", Tensor::from_shape(&[1, c, 1, 1], &beta)?)?;
        let scaled = model.wire_node("scale", tract_onnx::tract_core::ops::math::mul(), &[back, gamma])?[0];
        let out = model.wire_node("shift", tract_onnx::tract_core::ops::math::add(), &[scaled, beta])?[0];
        model.select_output_outlets(&[out])?;
        Ok(model)
    }

    fn input(n: usize, c: usize, hw: [usize; 2]) -> Tensor {
        let len = n * c * hw[0] * hw[1];
        // Offset and spread differ per channel, as after a convolution.
        let v: Vec<f32> =
            (0..len).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * (1.0 + (i % 7) as f32) + 3.0).collect();
        Tensor::from_shape(&[n, c, hw[0], hw[1]], &v).unwrap()
    }

    #[test]
    fn rewrites_the_pattern_and_matches_tract() -> TractResult<()> {
        for (n, c, groups, hw) in [(1, 32, 8, [8, 8]), (2, 12, 3, [5, 7]), (1, 4, 4, [1, 1])] {
            let plain = graph(n, c, groups, hw)?;
            let mut fused = plain.clone();
            assert_eq!(rewrite(&mut fused)?, 1, "{n} {c} {groups} {hw:?}");
            assert_eq!(fused.nodes().iter().filter(|node| node.op_is::<GroupNorm>()).count(), 1);
            assert!(fused.nodes().iter().all(|node| !node.op_is::<RmsNorm>()));
            let x = input(n, c, hw);
            let want = plain.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?.remove(0);
            let got = fused.into_runnable()?.run(tvec!(x.into_tvalue()))?.remove(0);
            let (want, got) = (want.try_as_plain_ram()?, got.try_as_plain_ram()?);
            let (want, got) = (want.as_slice::<f32>()?, got.as_slice::<f32>()?);
            let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{n} {c} {groups} {hw:?}: max abs difference {worst}");
        }
        Ok(())
    }

    /// [`graph`] with a SiLU after it; `shared`: the norm's result is also an output.
    fn graph_with_silu(n: usize, c: usize, groups: usize, hw: [usize; 2], shared: bool) -> TractResult<TypedModel> {
        let mut model = graph(n, c, groups, hw)?;
        let normed = model.output_outlets()?[0];
        let out = model.wire_node("silu", tract_onnx::tract_core::ops::nn::silu::silu(), &[normed])?[0];
        let outputs = if shared { vec![out, normed] } else { vec![out] };
        model.select_output_outlets(&outputs)?;
        Ok(model)
    }

    fn run(model: TypedModel, x: &Tensor) -> TractResult<Vec<Vec<f32>>> {
        let outputs = model.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?;
        outputs.iter().map(|t| Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())).collect()
    }

    #[test]
    fn takes_in_the_silu_that_follows() -> TractResult<()> {
        for (n, c, groups, hw) in [(1, 32, 8, [8, 8]), (2, 12, 3, [5, 7])] {
            let plain = graph_with_silu(n, c, groups, hw, false)?;
            let mut fused = plain.clone();
            assert_eq!(rewrite(&mut fused)?, 1);
            let ops: Vec<&GroupNorm> = fused.nodes().iter().filter_map(|node| node.op_as::<GroupNorm>()).collect();
            assert!(ops.len() == 1 && ops[0].silu, "{fused}");
            assert!(fused.nodes().iter().all(|node| node.op_as::<ElementWiseOp>().is_none()), "{fused}");
            let x = input(n, c, hw);
            let (want, got) = (run(plain, &x)?, run(fused, &x)?);
            let worst = want[0].iter().zip(&got[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{n} {c} {groups} {hw:?}: max abs difference {worst}");
        }
        Ok(())
    }

    #[test]
    fn leaves_the_silu_when_the_norm_is_used_elsewhere() -> TractResult<()> {
        let plain = graph_with_silu(1, 8, 2, [4, 4], true)?;
        let mut fused = plain.clone();
        assert_eq!(rewrite(&mut fused)?, 1);
        assert!(fused.nodes().iter().any(|node| node.op_as::<GroupNorm>().is_some_and(|op| !op.silu)));
        assert!(fused.nodes().iter().any(|node| node.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<Silu>())));
        let x = input(1, 8, [4, 4]);
        let (want, got) = (run(plain, &x)?, run(fused, &x)?);
        for (w, g) in want.iter().zip(&got) {
            let worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "max abs difference {worst}");
        }
        Ok(())
    }

    #[test]
    fn leaves_a_shared_intermediate_alone() -> TractResult<()> {
        // The normalized tensor also feeds a second output: fusing would lose it.
        let mut model = graph(1, 8, 2, [4, 4])?;
        let rms = model.node_by_name("rms")?.id;
        let outputs = [model.output_outlets()?[0], OutletId::new(rms, 0)];
        model.select_output_outlets(&outputs)?;
        assert_eq!(rewrite(&mut model)?, 0);
        Ok(())
    }

    #[cfg(feature = "multithread")]
    #[test]
    fn threads_split_the_groups_without_changing_a_bit() -> TractResult<()> {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        let (n, c, groups, hw) = (2, 12, 3, [5, 7]);
        let mut model = graph(n, c, groups, hw)?;
        rewrite(&mut model)?;
        let op = model.nodes().iter().find_map(|node| node.op_as::<GroupNorm>()).expect("fused").clone();
        let x = input(n, c, hw);
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let mut one = vec![0f32; x.len()];
        op.run(x, &mut one, hw[0] * hw[1])?;
        for threads in [2, 3] {
            let mut many = vec![f32::NAN; x.len()];
            multithread_tract_scope(Executor::multithread(threads), || op.run(x, &mut many, hw[0] * hw[1]))?;
            assert_eq!(one, many, "{threads} threads");
        }
        Ok(())
    }
}
