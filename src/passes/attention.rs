//! Attention as one operator (the operator and why: `crate::ops::attention`): finds
//! product → (scale) → (additive mask) → softmax → product in a typed graph, whatever the
//! exporter.
//!
//! Both products are tract `EinSum`s: the importer turns `MatMul` into one, an exported
//! `Einsum` already is one. So the pattern is read from the axes, not from operator names or
//! tensor ranks: the first product sums over one axis that its two inputs share (the depth),
//! keeps one axis of each input alone (the queries, the keys: the last axis of its output,
//! which the softmax runs over) and carries every other axis through (batch, heads). The
//! second product sums over the keys against a second input (the values), whose one axis of
//! its own becomes an output axis.
//!
//! The pass runs on the graph as imported, because declutter cuts the second product apart
//! where the values are a concatenation (SD3's joint attention: a product per part of the
//! keys, summed), and again after declutter, which may fold a computed scale into a constant.
//! It also takes a second product that declutter split over parts of the queries.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Div, Mul};
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::{bin_by_const, is_bin, single_use};
use crate::kernels::gemm;
use crate::ops::attention::{Attention, Layout};

/// Replaces every attention pattern (see the module docs) over float32 tensors by an
/// [`Attention`] node, when this CPU runs the kernel. Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(found) = pattern_at(model, id)? else { continue };
        let name = model.node(found.branches[0].last).name.clone();
        let mut patch = TypedModelPatch::default();
        let inputs = [found.q, found.k, found.v]
            .iter()
            .chain(&found.mask)
            .map(|&o| patch.tap_model(model, o))
            .collect::<TractResult<TVec<_>>>()?;
        let queries_out = found.layout.out.iter().position(|&a| a == found.layout.q.len() - 1).context("queries")?;
        let op = Attention { layout: found.layout, scale: found.scale };
        let out = patch.wire_node(format!("{name}.attention"), op, &inputs)?[0];
        for (i, branch) in found.branches.iter().enumerate() {
            let part = match &branch.slice {
                None => out,
                Some((start, end)) => {
                    let slice = Slice::new(queries_out, start.clone(), end.clone());
                    patch.wire_node(format!("{name}.attention.slice{i}"), slice, &[out])?[0]
                }
            };
            patch.shunt_outside(model, branch.last.into(), part)?;
        }
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// Folds the axis moves around every [`Attention`] node into its layout: a move in front of an
/// input (or in front of each input of a concatenation that feeds it, the same move for all),
/// and a move that alone reads its output. Returns how many nodes changed.
///
/// Why: exports split heads and join them again by `Transpose`, which tract runs as copies on
/// one thread, while the operator reads its inputs and writes its output through strides at no
/// cost. Declutter does not move them into our operator, which does not take axis changes.
pub(crate) fn absorb_moves(model: &mut TypedModel) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    let mut changed = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<Attention>() else { continue };
        let mut op = op.clone();
        let mut patch = TypedModelPatch::default();
        let mut inputs = TVec::new();
        let mut any = false;
        for (i, &input) in node.inputs.iter().enumerate() {
            let roles = match i {
                0 => &mut op.layout.q,
                1 => &mut op.layout.k,
                2 => &mut op.layout.v,
                _ => &mut op.layout.mask,
            };
            // Queries and keys also through uniform scalings, which the scale takes in: an
            // export of `scaled_dot_product_attention` scales each by the root of the scale.
            let mut at = input;
            loop {
                if let Some((x, perm)) = moved(model, at)? {
                    roles.iter_mut().for_each(|a| *a = perm[*a]);
                    at = x;
                } else if let Some((x, f)) = if i < 2 { same_shape_scaling(model, at)? } else { None } {
                    op.scale *= f;
                    at = x;
                } else {
                    break;
                }
            }
            any |= at != input;
            let tapped = if let Some(MovedConcat { parts, axis, order: perm }) = moved_concat(model, at)? {
                let parts = parts.iter().map(|&o| patch.tap_model(model, o)).collect::<TractResult<TVec<_>>>()?;
                let name = format!("{}.unmoved", model.node(at.node).name);
                roles.iter_mut().for_each(|a| *a = perm[*a]);
                any = true;
                patch.wire_node(name, TypedConcat { axis: perm[axis] }, &parts)?[0]
            } else {
                patch.tap_model(model, at)?
            };
            inputs.push(tapped);
        }
        let mut last = OutletId::new(id, 0);
        let successors = model.outlet_successors(last);
        if single_use(model, last)? {
            let after = model.node(successors[0].node);
            if let Some(perm) = move_perm(model, after)? {
                op.layout.out = perm.iter().map(|&a| op.layout.out[a]).collect();
                last = after.id.into();
                any = true;
            }
        }
        if !any {
            continue;
        }
        let out = patch.wire_node(&node.name, op, &inputs)?[0];
        patch.shunt_outside(model, last, out)?;
        patch.apply(model)?;
        changed += 1;
    }
    Ok(changed)
}

/// [`scaling`] at `outlet`'s node when its output has the shape of its input (no broadcast).
fn same_shape_scaling(model: &TypedModel, outlet: OutletId) -> TractResult<Option<(OutletId, f32)>> {
    let Some((x, f)) = scaling(model, model.node(outlet.node))? else { return Ok(None) };
    Ok((model.outlet_fact(x)?.shape == model.outlet_fact(outlet)?.shape).then_some((x, f)))
}

/// For a node that moves one axis of its input (`AxisOp::Move`): for each of its output's
/// axes, the input axis it is.
fn move_perm(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TVec<usize>>> {
    let Some(&AxisOp::Move(from, to)) = node.op_as::<AxisOp>() else { return Ok(None) };
    let rank = model.outlet_fact(node.inputs[0])?.rank();
    let mut perm: TVec<usize> = (0..rank).collect();
    let axis = perm.remove(from);
    perm.insert(to, axis);
    Ok(Some(perm))
}

/// When `outlet` is the output of one or more axis moves in a row: the input of the first and,
/// for each of `outlet`'s axes, the axis of that input it is.
fn moved(model: &TypedModel, outlet: OutletId) -> TractResult<Option<(OutletId, TVec<usize>)>> {
    let mut found: Option<(OutletId, TVec<usize>)> = None;
    let mut at = outlet;
    while let Some(perm) = move_perm(model, model.node(at.node))? {
        let total = match found {
            Some((_, outer)) => outer.iter().map(|&a| perm[a]).collect(),
            None => perm,
        };
        at = model.node(at.node).inputs[0];
        found = Some((at, total));
    }
    Ok(found)
}

/// What [`moved_concat`] finds.
struct MovedConcat {
    /// The moves' inputs.
    parts: TVec<OutletId>,
    /// The concatenation's axis.
    axis: usize,
    /// For each axis of the concatenation, the axis of the parts it is.
    order: TVec<usize>,
}

/// When `outlet` is a concatenation of outputs of axis moves ([`moved`]) that all move the same
/// way and feed nothing else: what [`MovedConcat`] holds.
fn moved_concat(model: &TypedModel, outlet: OutletId) -> TractResult<Option<MovedConcat>> {
    let node = model.node(outlet.node);
    let Some(concat) = node.op_as::<TypedConcat>() else { return Ok(None) };
    if !single_use(model, outlet)? {
        return Ok(None);
    }
    let mut parts = TVec::new();
    let mut common: Option<TVec<usize>> = None;
    for &input in &node.inputs {
        let Some((x, perm)) = moved(model, input)? else { return Ok(None) };
        if !single_use(model, input)? || common.as_ref().is_some_and(|first| *first != perm) {
            return Ok(None);
        }
        common = Some(perm);
        parts.push(x);
    }
    Ok(common.map(|order| MovedConcat { parts, axis: concat.axis, order }))
}

struct Found {
    q: OutletId,
    k: OutletId,
    v: OutletId,
    /// The additive mask on the scaled scores, if any.
    mask: Option<OutletId>,
    scale: f32,
    layout: Layout,
    branches: Vec<Branch>,
}

/// One second product. tract's declutter splits it when what follows uses parts of the
/// queries (SD3's joint attention: image tokens, then text tokens): each part then takes a
/// `Slice` of the softmax along the queries and has its own product with the same values.
struct Branch {
    /// The part of the queries, `None` for all of them.
    slice: Option<(TDim, TDim)>,
    /// The second product, whose output the operator's (or the part's) replaces.
    last: usize,
}

/// The positive, finite factor of a node that multiplies `x` by a uniform constant or divides
/// it by one: `(x, factor)`.
fn scaling(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(OutletId, f32)>> {
    let uniform = |k: &Tensor| -> TractResult<Option<f32>> {
        if k.datum_type() != f32::datum_type() || !k.is_uniform() || k.len() == 0 {
            return Ok(None);
        }
        Ok(Some(k.cast_to_scalar::<f32>()?))
    };
    let factor = if let Some((x, k)) = bin_by_const::<Mul>(model, node)? {
        uniform(&k)?.map(|f| (x, f))
    } else if let Some((x, k)) = bin_by_const::<Div>(model, node)? {
        // Only x / k: k / x is not a scaling.
        if x == node.inputs[0] {
            uniform(&k)?.map(|f| (x, 1.0 / f))
        } else {
            None
        }
    } else {
        None
    };
    Ok(factor.filter(|(_, f)| f.is_finite() && *f > 0.0))
}

/// Which of an `EinSum` axis' three slots (two inputs, the output) hold it, when it appears at
/// most once in each: `None` for a repeated axis (a diagonal).
fn presence(axis: &tract_onnx::tract_core::axes::Axis) -> Option<[bool; 3]> {
    let (a, b, y) = (axis.inputs[0].len(), axis.inputs[1].len(), axis.outputs[0].len());
    (a <= 1 && b <= 1 && y <= 1).then_some([a == 1, b == 1, y == 1])
}

/// A two-input float32 `EinSum` without quantization.
fn plain_einsum(node: &TypedNode) -> Option<&EinSum> {
    let op = node.op_as::<EinSum>()?;
    (op.q_params.is_none()
        && op.operating_dt == f32::datum_type()
        && node.inputs.len() == 2
        && op.axes.input_count() == 2
        && op.axes.output_count() == 1)
        .then_some(op)
}

fn pattern_at(model: &TypedModel, id: usize) -> TractResult<Option<Found>> {
    let softmax_node = model.node(id);
    let Some(softmax) = softmax_node.op_as::<Softmax>() else { return Ok(None) };
    let scores = model.outlet_fact(softmax_node.inputs[0])?;
    let rank = scores.rank();
    if softmax.kind != SoftmaxKind::Softmax
        || softmax.quant_output_dt.is_some()
        || scores.datum_type != f32::datum_type()
        || rank < 2
        || *softmax.axes != [rank - 1]
        || !single_use(model, softmax_node.inputs[0])?
        || model.output_outlets()?.contains(&id.into())
    {
        return Ok(None);
    }
    // Up: an optional additive mask, an optional scaling, then the first product.
    let mut up = model.node(softmax_node.inputs[0].node);
    let mut mask = None;
    if is_bin::<Add>(up) && up.inputs.len() == 2 {
        let sides = [(up.inputs[0], up.inputs[1]), (up.inputs[1], up.inputs[0])];
        for (x, m) in sides {
            let below = model.node(x.node);
            if (plain_einsum(below).is_some() || scaling(model, below)?.is_some()) && single_use(model, x)? {
                // The mask must not broadcast the scores, only itself.
                if model.outlet_fact(x)?.shape != scores.shape {
                    return Ok(None);
                }
                mask = Some(m);
                up = below;
                break;
            }
        }
        if mask.is_none() {
            return Ok(None);
        }
    }
    let mut scale = 1.0;
    if let Some((x, factor)) = scaling(model, up)? {
        if !single_use(model, x)? {
            return Ok(None);
        }
        scale = factor;
        up = model.node(x.node);
    }
    let Some(first) = plain_einsum(up) else { return Ok(None) };
    // Down: the second product, or its parts over slices of the queries.
    let mut branches = Vec::new();
    let mut second: Option<(&EinSum, usize, OutletId)> = None;
    // Slices, by axis of the scores: the roles say below whether that axis is the queries'.
    let mut sliced = Vec::new();
    for down in model.outlet_successors(id.into()).to_vec() {
        let mut at = down;
        let mut slice = None;
        if let Some(s) = model.node(down.node).op_as::<Slice>() {
            if !single_use(model, down.node.into())? {
                return Ok(None);
            }
            sliced.push(s.axis);
            slice = Some((s.start.clone(), s.end.clone()));
            at = model.outlet_successors(down.node.into())[0];
        } else if model.outlet_successors(id.into()).len() != 1 {
            return Ok(None);
        }
        let last = model.node(at.node);
        let Some(op) = plain_einsum(last) else { return Ok(None) };
        let v = last.inputs[1 - at.slot];
        if v == id.into() || v.node == down.node {
            return Ok(None);
        }
        match second {
            None => second = Some((op, at.slot, v)),
            Some((seen, slot, values)) if *seen == *op && slot == at.slot && values == v => (),
            Some(_) => return Ok(None),
        }
        branches.push(Branch { slice, last: last.id });
    }
    let Some((second, p, v)) = second else { return Ok(None) };
    let Some(roles) = roles(first, second, p, rank)? else { return Ok(None) };
    if sliced.iter().any(|&axis| axis != roles.queries) {
        return Ok(None);
    }
    let (qi, ki) = (roles.q_input, 1 - roles.q_input);
    let mut layout = roles.layout;
    if let Some(m) = mask {
        // Float32, of the scores' rank, each axis the scores' size or 1; read as [batch…,
        // query, key] (the batch axes in the scores' order, as the operator takes them).
        let fact = model.outlet_fact(m)?;
        let fits = fact.datum_type == f32::datum_type()
            && fact.rank() == rank
            && fact.shape.iter().zip(scores.shape.iter()).all(|(a, b)| a == b || a.is_one());
        if !fits {
            return Ok(None);
        }
        layout.mask =
            (0..rank).filter(|&a| a != roles.queries && a != rank - 1).chain([roles.queries, rank - 1]).collect();
    }
    let found = Found { q: up.inputs[qi], k: up.inputs[ki], v, mask, scale, layout, branches };
    // The roles' sizes must agree (no broadcasting between the inputs).
    let shape = |o: OutletId| -> TractResult<TVec<TDim>> { Ok(model.outlet_fact(o)?.shape.to_tvec()) };
    let (q, k, v) = (shape(found.q)?, shape(found.k)?, shape(found.v)?);
    let pick = |s: &[TDim], perm: &[usize]| perm.iter().map(|&a| s[a].clone()).collect::<TVec<_>>();
    let (q, k, v) = (pick(&q, &found.layout.q), pick(&k, &found.layout.k), pick(&v, &found.layout.v));
    let nb = rank - 2;
    let agree = q[..nb] == k[..nb] && q[..nb] == v[..nb] && q[nb] == k[nb + 1] && k[nb] == v[nb + 1];
    let empty = [&q[nb], &k[nb]].iter().any(|d| d.to_usize().is_ok_and(|n| n == 0));
    Ok((agree && !empty).then_some(found))
}

struct Roles {
    /// Which input of the first product holds the queries.
    q_input: usize,
    /// The scores' axis of the queries.
    queries: usize,
    layout: Layout,
}

/// Reads the roles from the two products' axes: `first` writes scores of `rank` axes (the keys
/// last), `second` takes their softmax as input `p`.
fn roles(first: &EinSum, second: &EinSum, p: usize, rank: usize) -> TractResult<Option<Roles>> {
    // First product: the depth (both inputs), the batch axes (everywhere), one axis of each
    // input alone, nothing else.
    let (mut depth, mut batch, mut alone) = (None, Vec::new(), [None, None]);
    for axis in first.axes.iter_all_axes() {
        match presence(axis) {
            Some([true, true, false]) if depth.is_none() => depth = Some(axis),
            Some([true, true, true]) => batch.push(axis),
            Some([true, false, true]) if alone[0].is_none() => alone[0] = Some(axis),
            Some([false, true, true]) if alone[1].is_none() => alone[1] = Some(axis),
            _ => return Ok(None),
        }
    }
    let (Some(depth), [Some(a0), Some(a1)]) = (depth, alone) else { return Ok(None) };
    // The keys are the scores' last axis.
    let q_input = if a1.outputs[0][0] == rank - 1 {
        0
    } else if a0.outputs[0][0] == rank - 1 {
        1
    } else {
        return Ok(None);
    };
    let (query, key) = if q_input == 0 { (a0, a1) } else { (a1, a0) };
    let k_input = 1 - q_input;
    batch.sort_by_key(|a| a.outputs[0][0]);
    let query_at = query.outputs[0][0];
    // Second product: over the scores' axes (input p) and the values' (input 1 − p).
    let v_input = 1 - p;
    let (mut feature, mut v_of, mut out_of) = (None, vec![None; rank], vec![None; rank]);
    for axis in second.axes.iter_all_axes() {
        let Some(present) = presence(axis) else { return Ok(None) };
        let (in_p, in_v, out) = (present[p], present[v_input], present[2]);
        if !in_p {
            if in_v && out && feature.is_none() {
                feature = Some(axis);
                continue;
            }
            return Ok(None);
        }
        let at = axis.inputs[p][0];
        let ok = match (in_v, out) {
            (true, false) => at == rank - 1,
            (false, true) => at == query_at,
            (true, true) => at != rank - 1 && at != query_at,
            (false, false) => false,
        };
        if !ok {
            return Ok(None);
        }
        v_of[at] = axis.inputs[v_input].first().copied();
        out_of[at] = axis.outputs[0].first().copied();
    }
    let Some(feature) = feature else { return Ok(None) };
    let batch_at: Vec<usize> = batch.iter().map(|a| a.outputs[0][0]).collect();
    let nb = batch.len();
    let v_pos = |at: usize| v_of[at].context("attention: a batch axis the values lack");
    let mut layout = Layout {
        q: batch
            .iter()
            .map(|a| a.inputs[q_input][0])
            .chain([depth.inputs[q_input][0], query.inputs[q_input][0]])
            .collect(),
        k: batch
            .iter()
            .map(|a| a.inputs[k_input][0])
            .chain([key.inputs[k_input][0], depth.inputs[k_input][0]])
            .collect(),
        v: batch_at.iter().map(|&at| v_pos(at)).collect::<TractResult<TVec<_>>>()?,
        out: tvec![0; nb + 2],
        mask: tvec![],
    };
    layout.v.extend([feature.inputs[v_input][0], v_pos(rank - 1)?]);
    for (i, &at) in batch_at.iter().enumerate() {
        layout.out[out_of[at].context("attention: a batch axis the output lacks")?] = i;
    }
    layout.out[feature.outputs[0][0]] = nb;
    layout.out[out_of[query_at].context("attention: the output lacks the queries")?] = nb + 1;
    Ok(Some(Roles { q_input, queries: query_at, layout }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::f32s;
    use tract_onnx::tract_core::ops::math::{add, mul};
    use tract_onnx::tract_core::ops::nn::Softmax;

    /// product → scale → softmax → product, with the products' axes written as einsum
    /// equations over the sources `q`, `k`, `v` of the given shapes.
    /// `values_first`: the values are the second product's first input.
    fn graph(
        first: &str,
        second: &str,
        shapes: [&[usize]; 3],
        scale: Option<f32>,
        values_first: bool,
    ) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let q = model.add_source("q", f32::fact(shapes[0]))?;
        let k = model.add_source("k", f32::fact(shapes[1]))?;
        let v = model.add_source("v", f32::fact(shapes[2]))?;
        let mut s = model.wire_node("scores", EinSum::new(first.parse()?, f32::datum_type()), &[q, k])?[0];
        if let Some(scale) = scale {
            let rank = model.outlet_fact(s)?.rank();
            let c = model.add_const("scale", tensor0(scale).broadcast_into_rank(rank)?)?;
            s = model.wire_node("scaled", mul(), &[s, c])?[0];
        }
        let rank = model.outlet_fact(s)?.rank();
        let p = model.wire_node("softmax", Softmax::new(tvec![rank - 1], None, SoftmaxKind::Softmax), &[s])?[0];
        let (a, b) = if values_first { (v, p) } else { (p, v) };
        let y = model.wire_node("out", EinSum::new(second.parse()?, f32::datum_type()), &[a, b])?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    fn inputs(shapes: [&[usize]; 3]) -> TVec<TValue> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let x: Vec<f32> = (0..n).map(|j| (((j + 5 * i) * 37 % 29) as f32 - 14.0) / 6.0).collect();
                Tensor::from_shape(s, &x).expect("shape").into_tvalue()
            })
            .collect()
    }

    /// Runs the graph as tract does and after the rewrite; returns how many were replaced and
    /// the largest difference.
    fn compare(model: TypedModel, shapes: [&[usize]; 3]) -> TractResult<(usize, f32)> {
        let want = model.clone().into_runnable()?.run(inputs(shapes))?;
        let mut model = model;
        let n = rewrite(&mut model)?;
        let got = model.into_runnable()?.run(inputs(shapes))?;
        let mut worst = 0f32;
        for (want, got) in want.iter().zip(&got) {
            assert_eq!(want.shape(), got.shape());
            let (want, got) = (f32s(want, "want")?, f32s(got, "got")?);
            worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
        }
        Ok((n, worst))
    }

    /// The two products' equations, the shapes of q, k and v, the scale.
    type Case<'a> = (&'a str, &'a str, [&'a [usize]; 3], Option<f32>);

    #[test]
    fn rewrites_attention_in_any_layout_and_matches_tract() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        // openai's QKVAttention ("bct,bcs->bts", then "bts,bcs->bct"); diffusers' scaled
        // dot-product attention over [b, h, t, d] with the keys transposed in the einsum; the
        // values first in the second product; 2-D without batch; token counts off the blocks.
        let cases: [Case; 4] = [
            ("bct,bcs->bts", "bts,bcs->bct", [&[2, 8, 37], &[2, 8, 37], &[2, 8, 37]], Some(0.35)),
            ("bhtd,bhsd->bhts", "bhts,bhsd->bhtd", [&[1, 2, 20, 4], &[1, 2, 7, 4], &[1, 2, 7, 5]], None),
            ("btd,bsd->bts", "bsf,bts->btf", [&[3, 16, 6], &[3, 33, 6], &[3, 33, 9]], Some(2.0)),
            ("td,sd->ts", "ts,sf->tf", [&[5, 3], &[4, 3], &[4, 2]], None),
        ];
        for (first, second, shapes, scale) in cases {
            let (n, worst) = compare(graph(first, second, shapes, scale, second.starts_with("bsf"))?, shapes)?;
            assert_eq!(n, 1, "{first} {second}");
            assert!(worst < 1e-5, "{first} {second}: max abs difference {worst}");
        }
        Ok(())
    }

    #[test]
    fn takes_in_second_products_split_over_the_queries() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        // SD3's joint attention after declutter: the softmax sliced along the queries (image
        // tokens, then text tokens), each part with its own product by the same values.
        let shapes: [&[usize]; 3] = [&[2, 21, 4], &[2, 21, 4], &[2, 21, 4]];
        let mut model = TypedModel::default();
        let [q, k, v] = [("q", 0), ("k", 1), ("v", 2)].map(|(name, i)| model.add_source(name, f32::fact(shapes[i])));
        let (q, k, v) = (q?, k?, v?);
        let scores = model.wire_node("scores", EinSum::new("btd,bsd->bts".parse()?, f32::datum_type()), &[q, k])?;
        let p = model.wire_node("softmax", Softmax::new(tvec![2], None, SoftmaxKind::Softmax), &scores)?[0];
        let mut outputs = tvec![];
        for (i, (start, end)) in [(0, 16), (16, 21)].into_iter().enumerate() {
            let part = model.wire_node(format!("part{i}"), Slice::new(1, start, end), &[p])?;
            let mapping = "bts,bsf->btf".parse()?;
            outputs
                .push(model.wire_node(format!("out{i}"), EinSum::new(mapping, f32::datum_type()), &[part[0], v])?[0]);
        }
        model.select_output_outlets(&outputs)?;
        let (n, worst) = compare(model, shapes)?;
        assert_eq!(n, 1);
        assert!(worst < 1e-5, "max abs difference {worst}");
        Ok(())
    }

    /// [b, h, t, d] attention with a scale of 0.3 and the mask `mask` wires added to the scaled
    /// scores.
    fn masked_graph(
        shapes: [&[usize]; 3],
        mask: impl FnOnce(&mut TypedModel) -> TractResult<OutletId>,
    ) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let [q, k, v] = [("q", 0), ("k", 1), ("v", 2)].map(|(name, i)| model.add_source(name, f32::fact(shapes[i])));
        let (q, k, v) = (q?, k?, v?);
        let scores = model.wire_node("scores", EinSum::new("bhtd,bhsd->bhts".parse()?, f32::datum_type()), &[q, k])?[0];
        let c = model.add_const("scale", tensor0(0.3f32).broadcast_into_rank(4)?)?;
        let scaled = model.wire_node("scaled", mul(), &[scores, c])?[0];
        let m = mask(&mut model)?;
        let masked = model.wire_node("masked", add(), &[m, scaled])?[0];
        let p = model.wire_node("softmax", Softmax::new(tvec![3], None, SoftmaxKind::Softmax), &[masked])?[0];
        let y = model.wire_node("out", EinSum::new("bhts,bhsd->bhtd".parse()?, f32::datum_type()), &[p, v])?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    #[test]
    fn takes_in_an_additive_mask_on_the_scaled_scores() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        // CLIP's causal mask (one [t, s] matrix for every batch and head, the float32 minimum
        // above the diagonal) and a padding mask per batch item over the keys ([b, 1, 1, s]).
        let (b, h, t, s, d) = (2, 3, 21, 21, 8);
        let shapes: [&[usize]; 3] = [&[b, h, t, d], &[b, h, s, d], &[b, h, s, d]];
        let causal = Tensor::from_shape(
            &[1, 1, t, s],
            &(0..t * s).map(|i| if i % s > i / s { f32::MIN } else { 0.0 }).collect::<Vec<_>>(),
        )?;
        let padding = Tensor::from_shape(
            &[b, 1, 1, s],
            &(0..b * s).map(|i| if i % s >= s - 3 * (i / s) { -1e4f32 } else { 0.5 }).collect::<Vec<_>>(),
        )?;
        for mask in [causal, padding] {
            let shape = mask.shape().to_vec();
            let model = masked_graph(shapes, |model| model.add_const("mask", mask))?;
            let (n, worst) = compare(model, shapes)?;
            assert_eq!(n, 1, "mask {shape:?}");
            assert!(worst < 1e-5, "mask {shape:?}: max abs difference {worst}");
        }
        // A mask computed from an input (padding from an attention mask) is taken too.
        let mut model = masked_graph(shapes, |model| model.add_source("mask", f32::fact([b, 1, 1, s])))?;
        assert_eq!(rewrite(&mut model)?, 1, "a computed mask");
        Ok(())
    }

    #[test]
    fn leaves_other_patterns_alone() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        // Values without an axis of their own; a second product that sums over the queries.
        let mut model = graph("bct,bcs->bts", "bts,bs->bt", [&[2, 8, 12], &[2, 8, 12], &[2, 12]], None, false)?;
        assert_eq!(rewrite(&mut model)?, 0);
        let shapes: [&[usize]; 3] = [&[2, 8, 12], &[2, 8, 12], &[2, 8, 12]];
        let mut model = graph("bct,bcs->bts", "bts,bct->bcs", shapes, None, false)?;
        assert_eq!(rewrite(&mut model)?, 0);
        // Scores needed elsewhere (a second output).
        let mut model = graph("bct,bcs->bts", "bts,bcs->bct", shapes, None, false)?;
        let scores = model.node_by_name("scores")?.id;
        let out = model.output_outlets()?[0];
        model.select_output_outlets(&[out, scores.into()])?;
        assert_eq!(rewrite(&mut model)?, 0);
        Ok(())
    }

    #[test]
    fn reads_through_the_moves_and_scalings_around_it() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        // SD3's joint attention as exported: each stream's heads split by a transpose, the two
        // streams concatenated along the tokens, queries and keys each scaled by a root of the
        // scale, the keys transposed for the product, the heads joined by a transpose after.
        let (b, h, d, t1, t2) = (1, 2, 4, 9, 5);
        let mut model = TypedModel::default();
        let mut parts = Vec::new();
        for role in ["q", "k", "v"] {
            let mut moved = tvec![];
            for (stream, t) in [("img", t1), ("txt", t2)] {
                let x = model.add_source(format!("{role}_{stream}"), f32::fact([b, t, h, d]))?;
                moved.push(model.wire_node(format!("{role}_{stream}.heads"), AxisOp::Move(1, 2), &[x])?[0]);
            }
            parts.push(model.wire_node(format!("{role}.joint"), TypedConcat { axis: 2 }, &moved)?[0]);
        }
        let root = model.add_const("root", tensor0(0.7f32).broadcast_into_rank(4)?)?;
        let q = model.wire_node("q.scaled", mul(), &[parts[0], root])?[0];
        let k = model.wire_node("k.scaled", mul(), &[parts[1], root])?[0];
        let k = model.wire_node("k.transposed", AxisOp::Move(3, 2), &[k])?[0];
        let scores = model.wire_node("scores", EinSum::new("bhtd,bhds->bhts".parse()?, f32::datum_type()), &[q, k])?;
        let p = model.wire_node("softmax", Softmax::new(tvec![3], None, SoftmaxKind::Softmax), &scores)?[0];
        let o = model.wire_node("out", EinSum::new("bhts,bhsd->bhtd".parse()?, f32::datum_type()), &[p, parts[2]])?[0];
        let y = model.wire_node("joined", AxisOp::Move(2, 1), &[o])?;
        model.select_output_outlets(&y)?;

        let inputs: TVec<TValue> = (0..6)
            .map(|i| {
                let t = if i % 2 == 0 { t1 } else { t2 };
                let x: Vec<f32> = (0..b * t * h * d).map(|j| (((j + 5 * i) * 37 % 29) as f32 - 14.0) / 6.0).collect();
                Tensor::from_shape(&[b, t, h, d], &x).expect("shape").into_tvalue()
            })
            .collect();
        let want = model.clone().into_runnable()?.run(inputs.clone())?;
        assert_eq!(rewrite(&mut model)?, 1);
        assert_eq!(absorb_moves(&mut model)?, 1);
        let kept: Vec<String> = model
            .eval_order()?
            .into_iter()
            .map(|id| model.node(id))
            .filter(|n| n.op_is::<AxisOp>() || is_bin::<Mul>(n))
            .map(|n| n.name.clone())
            .collect();
        assert!(kept.is_empty(), "moves or scalings left: {kept:?}");
        let got = model.into_runnable()?.run(inputs)?;
        assert_eq!(want[0].shape(), got[0].shape());
        let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
        let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "max abs difference {worst}");
        Ok(())
    }
}
