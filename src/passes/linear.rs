//! Linear layers on our matrix kernel (the operator and why: `crate::ops::linear`): every
//! float32 `EinSum` of an input by constant two-axis weights, and the constant bias `Add` that
//! follows it, whatever the export made of `Linear`, `Gemm` or `MatMul`.
//!
//! Read from the axes: the weights hold the summed axes (c, one or more: an attention's output
//! projection sums over heads and depth) and one axis of their own, which the output has (k); every other axis of the input is a row, which the output keeps, or has
//! one element and is dropped; the output may add axes of one element.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;

use super::{bin_by_const, single_use};
use crate::kernels::gemm;
use crate::ops::linear::{Linear, LinearAxes, OutAxis};
use crate::ops::packed::{Packer, Site};
use crate::ops::strided_offset;

/// Whether the rewrite runs in a plan on this CPU (`half`: the plan multiplies in float16):
/// on aarch64 only float16 plans on FP16 cores (see `crate::ops::linear`), elsewhere wherever
/// the CPU runs our kernel.
fn runs_here(half: bool) -> bool {
    if cfg!(target_arch = "aarch64") {
        half && crate::kernels::half_products()
    } else {
        gemm::available()
    }
}

/// Rows below which a layer stays on tract: on aarch64 the float16 product computes rows in
/// blocks of `ROWS`, and a layer of fewer rows (a time embedding's, one per image) would waste
/// most of its block, where tract's float32 product of a single row costs less and rounds
/// nothing to float16. None elsewhere.
#[cfg(target_arch = "aarch64")]
const FEWEST_ROWS: Option<usize> = Some(crate::kernels::aarch64::gemm_f16::ROWS);
#[cfg(not(target_arch = "aarch64"))]
const FEWEST_ROWS: Option<usize> = None;

/// Replaces every linear layer (see the module docs) by a [`Linear`] node, when this CPU runs
/// the kernel. Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel, packer: &Packer) -> TractResult<usize> {
    if !runs_here(packer.half_products()) {
        return Ok(0);
    }
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some((op, x, last)) = linear_at(model, id, packer)? else { continue };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, x)?;
        let y = patch.wire_node(format!("{name}.linear"), op, &[x])?[0];
        patch.shunt_outside(model, last.into(), y)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// A constant's elements in C order (tract may hold a broadcast constant with other strides).
fn in_c_order(t: &Tensor) -> TractResult<Vec<f32>> {
    Ok(t.to_plain_array_view::<f32>()?.iter().copied().collect())
}

/// The operator, its input and the node whose output it replaces (the bias `Add` when it takes
/// one in).
fn linear_at(model: &TypedModel, id: usize, packer: &Packer) -> TractResult<Option<(Linear, OutletId, usize)>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
        || einsum.axes.input_count() != 2
        || einsum.axes.output_count() != 1
    {
        return Ok(None);
    }
    let facts = [model.outlet_fact(node.inputs[0])?, model.outlet_fact(node.inputs[1])?];
    let (xi, wi) = match (&facts[0].konst, &facts[1].konst) {
        (None, Some(_)) => (0, 1),
        (Some(_), None) => (1, 0),
        _ => return Ok(None),
    };
    let (x, w) = (facts[xi], facts[wi].konst.clone().expect("constant"));
    if x.datum_type != f32::datum_type() || w.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let out_rank = model.outlet_fact(id.into())?.rank();
    let mut k = None;
    let mut summed: Vec<(usize, usize)> = Vec::new(); // (input axis, weights axis)
    let mut rows: Vec<(usize, usize)> = Vec::new(); // (input axis, output axis)
    let mut ones = Vec::new();
    for axis in einsum.axes.iter_all_axes() {
        let (inx, inw, out) = (&axis.inputs[xi], &axis.inputs[wi], &axis.outputs[0]);
        if inx.len() > 1 || inw.len() > 1 || out.len() > 1 {
            return Ok(None);
        }
        match (inx.first(), inw.first(), out.first()) {
            (Some(&a), Some(&b), None) => summed.push((a, b)),
            (None, Some(&b), Some(&o)) if k.is_none() => k = Some((b, o)),
            (Some(&a), None, Some(&o)) => rows.push((a, o)),
            (Some(&a), None, None) if x.shape[a].is_one() => (),
            (None, None, Some(&o)) => ones.push(o),
            _ => return Ok(None),
        }
    }
    // Every weights axis is summed or k.
    let Some((w_k, out_k)) = k else { return Ok(None) };
    let t =
        rows.iter().map(|&(a, _)| x.shape[a].as_i64().and_then(|n| usize::try_from(n).ok())).product::<Option<usize>>();
    if FEWEST_ROWS.is_some_and(|least| t.is_none_or(|t| t < least)) {
        return Ok(None);
    }
    if summed.is_empty() || summed.len() + 1 != w.rank() {
        return Ok(None);
    }
    let kk = w.shape()[w_k];
    let c_dims: TVec<usize> = summed.iter().map(|&(_, b)| w.shape()[b]).collect();
    let cc: usize = c_dims.iter().product();
    rows.sort_unstable();
    let mut out = tvec![OutAxis::One; out_rank];
    out[out_k] = OutAxis::Features;
    for (i, &(_, o)) in rows.iter().enumerate() {
        out[o] = OutAxis::Row(i);
    }
    debug_assert!(ones.iter().all(|&o| out[o] == OutAxis::One));
    let axes = LinearAxes {
        rows: rows.iter().map(|&(a, _)| a).collect(),
        features: summed.iter().map(|&(a, _)| a).collect(),
        out,
    };
    // W as k × c, the summed axes flattened in the einsum's order.
    let natural = Tensor::natural_strides(w.shape());
    let c_strides: TVec<usize> = summed.iter().map(|&(_, b)| natural[b] as usize).collect();
    // The constant's own elements where tract holds them in C order (a plan file then serves
    // the packed weights without a copy of them), else a copy.
    let all: std::borrow::Cow<[f32]> = match crate::ops::f32s(&w, "linear") {
        Ok(values) => values.into(),
        Err(_) => in_c_order(&w)?.into(),
    };
    let gather = || {
        let mut weights = vec![0f32; kk * cc];
        for (f, row) in weights.chunks_exact_mut(cc.max(1)).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = all[f * natural[w_k] as usize + strided_offset(i, &c_dims, &c_strides)];
            }
        }
        weights
    };
    let strides = [cc, 1];
    let (bias, last) = match bias_after(model, id, out_k, kk)? {
        Some((values, add)) => (Some(values), add),
        None => (None, id),
    };
    let site = Site { packer, node: &node.name, origin: super::origin(model, node.inputs[wi]) };
    let op = Linear::new_in(site, &all, gather, strides, bias.as_deref(), [kk, cc], axes);
    Ok(Some((op, node.inputs[xi], last)))
}

/// The constant bias that the node after `id` adds, when that node alone reads `id`'s output
/// and adds a float32 constant that varies along the output's axis `out_k` (of `k` features) at
/// most: its `k` values and the `Add` node.
fn bias_after(model: &TypedModel, id: usize, out_k: usize, k: usize) -> TractResult<Option<(Vec<f32>, usize)>> {
    if !single_use(model, id.into())? {
        return Ok(None);
    }
    let out_rank = model.outlet_fact(id.into())?.rank();
    let add = model.node(model.outlet_successors(id.into())[0].node);
    let Some((from, b)) = bin_by_const::<Add>(model, add)? else { return Ok(None) };
    let along_k = b.rank() <= out_rank
        && b.shape().iter().rev().enumerate().all(|(i, &n)| n == 1 || (out_rank - 1 - i == out_k && n == k));
    if from != OutletId::from(id) || b.datum_type() != f32::datum_type() || !along_k {
        return Ok(None);
    }
    let values = in_c_order(&b)?;
    Ok(Some((if values.len() == k { values } else { vec![values[0]; k] }, add.id)))
}

/// Takes into each [`Linear`] node the constant bias `Add` after it that [`rewrite`] left out:
/// on the graph as imported, the bias that ONNX broadcasts to the layer's rank (`[k]` added to
/// `[…, k]`) is not yet a constant; declutter makes it one. Returns how many were taken.
pub(crate) fn fold_biases(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<Linear>() else { continue };
        let Some(out_k) = op.axes.out.iter().position(|&a| a == OutAxis::Features) else { continue };
        let Some((values, add)) = bias_after(model, id, out_k, op.k)? else { continue };
        let mut op = op.clone();
        let mut bias = crate::ops::f32s(&op.bias, "linear")?.to_vec();
        bias.iter_mut().zip(&values).for_each(|(b, v)| *b += v);
        op.bias = Arc::new(tensor1(&bias));
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let y = patch.wire_node(&node.name, op, &[x])?[0];
        patch.shunt_outside(model, add.into(), y)?;
        patch.apply(model)?;
        folded += 1;
    }
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::f32s;
    use tract_onnx::tract_core::ops::math::add;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 37 % 29) as f32 - 14.0) / 9.0).collect()
    }

    /// `x` of `x_shape` times constant `w` of `w_shape` by `equation` (x first), plus a constant
    /// bias of `bias_shape` when given.
    fn graph(
        equation: &str,
        x_shape: &[usize],
        w_shape: &[usize],
        bias_shape: Option<&[usize]>,
    ) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(x_shape))?;
        let n: usize = w_shape.iter().product();
        let w = model.add_const("w", Tensor::from_shape(w_shape, &values(n, 3))?)?;
        let mut y = model.wire_node("product", EinSum::new(equation.parse()?, f32::datum_type()), &[x, w])?;
        if let Some(shape) = bias_shape {
            let n: usize = shape.iter().product();
            let b = model.add_const("b", Tensor::from_shape(shape, &values(n, 7))?)?;
            y = model.wire_node("bias", add(), &[y[0], b])?;
        }
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    /// The product's equation, the shapes of x and of the weights, the bias' shape.
    type Case<'a> = (&'a str, &'a [usize], &'a [usize], Option<&'a [usize]>);

    /// A packer for plans the rewrite runs in: on aarch64 float16 ones, whose sums run in
    /// float16 (hence the tolerance).
    fn packer() -> (Packer, f32) {
        let packer = Packer::default();
        packer.set_half_products(true);
        (packer, if cfg!(target_arch = "aarch64") { 3e-2 } else { 1e-5 })
    }

    #[test]
    fn linear_layers_in_any_layout_match_tract() -> TractResult<()> {
        if !runs_here(true) {
            return Ok(());
        }
        let (packer, tolerance) = packer();
        // Token-major with a bias (torch's Linear); weights as [c, k] (MatMul) and [k, c] (Gemm
        // transB); a dropped axis of one and an added one (SD3's time embedding); channels-first
        // rows; a single row (left to tract on aarch64: fewer rows than a block); more rows and
        // features than one block or panel group.
        let cases: [Case; 8] = [
            ("btc,ck->btk", &[2, 21, 10], &[10, 13], Some(&[1, 1, 13])),
            ("btc,kc->btk", &[1, 40, 7], &[9, 7], Some(&[1, 1, 9])),
            ("akm,kn->mn", &[1, 16, 13], &[16, 12], None),
            ("mk,kn->anm", &[15, 8], &[8, 6], Some(&[1, 6, 1])),
            ("bct,kc->bkt", &[2, 6, 19], &[31, 6], None),
            ("k,nk->n", &[33], &[70, 33], Some(&[70])),
            // Summed over two axes (an attention's output projection over heads and depth),
            // in the input's order and in another.
            ("abmk,bkn->anm", &[1, 3, 14, 5], &[3, 5, 7], None),
            ("bmhd,dhn->bmn", &[2, 13, 3, 4], &[4, 3, 9], Some(&[1, 1, 9])),
        ];
        for (equation, x_shape, w_shape, bias) in cases {
            let model = graph(equation, x_shape, w_shape, bias)?;
            let n: usize = x_shape.iter().product();
            let input = tvec![Tensor::from_shape(x_shape, &values(n, 1))?.into_tvalue()];
            let want = model.clone().into_runnable()?.run(input.clone())?;
            let mut rewritten = model;
            let single_row = x_shape.len() == 1;
            if FEWEST_ROWS.is_some_and(|least| least > 1) && single_row {
                assert_eq!(rewrite(&mut rewritten, &packer)?, 0, "{equation}");
                continue;
            }
            assert_eq!(rewrite(&mut rewritten, &packer)?, 1, "{equation}");
            let got = rewritten.into_runnable()?.run(input)?;
            assert_eq!(want[0].shape(), got[0].shape(), "{equation}");
            for (a, b) in f32s(&want[0], "want")?.iter().zip(f32s(&got[0], "got")?) {
                assert!((a - b).abs() < tolerance * (1.0 + a.abs()), "{equation}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn leaves_products_of_two_inputs_and_batched_weights() -> TractResult<()> {
        let mut model = TypedModel::default();
        let a = model.add_source("a", f32::fact([4, 5]))?;
        let b = model.add_source("b", f32::fact([5, 6]))?;
        let y = model.wire_node("product", EinSum::new("mk,kn->mn".parse()?, f32::datum_type()), &[a, b])?;
        model.select_output_outlets(&y)?;
        let (packer, _) = packer();
        assert_eq!(rewrite(&mut model, &packer)?, 0);
        let mut model = graph("bmk,bkn->bmn", &[2, 4, 5], &[2, 5, 6], None)?;
        assert_eq!(rewrite(&mut model, &packer)?, 0);
        Ok(())
    }

    #[test]
    fn a_bias_added_after_the_layer_is_taken_in() -> TractResult<()> {
        if !runs_here(true) {
            return Ok(());
        }
        let (packer, tolerance) = packer();
        // The layer rewritten first, its bias `Add` seen only after (as on the graphs the
        // import leaves with the bias not yet a constant).
        let mut model = graph("btc,ck->btk", &[1, 21, 10], &[10, 13], None)?;
        let input = tvec![Tensor::from_shape(&[1, 21, 10], &values(210, 1))?.into_tvalue()];
        assert_eq!(rewrite(&mut model, &packer)?, 1);
        let layer = model.output_outlets()?[0];
        let b = model.add_const("b", Tensor::from_shape(&[1, 1, 13], &values(13, 5))?)?;
        let y = model.wire_node("bias", add(), &[layer, b])?;
        model.select_output_outlets(&y)?;
        let want = model.clone().into_runnable()?.run(input.clone())?;
        assert_eq!(fold_biases(&mut model)?, 1);
        let adds = model.eval_order()?.into_iter().filter(|&id| super::super::is_bin::<Add>(model.node(id))).count();
        assert_eq!(adds, 0);
        let got = model.into_runnable()?.run(input)?;
        for (a, b) in f32s(&want[0], "want")?.iter().zip(f32s(&got[0], "got")?) {
            assert!((a - b).abs() < tolerance * (1.0 + a.abs()), "{a} vs {b}");
        }
        Ok(())
    }
}
