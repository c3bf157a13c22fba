//! GELU chains, however they are spelled, as one [`Gelu`] node (the operator and why:
//! `crate::ops::gelu`).
//!
//! Exporters write GELU in many ways: `x · x · x` or `Pow(x, 3)`, `0.5 · x` first or last,
//! `x / √2` or `x · (1/√2)`, the constants on either side, or tract's own `GeluApproximate` and
//! `GeluExact` where its declutter recognized one. Matching each spelling node by node would
//! miss the next exporter's. So the pass matches by what a chain computes:
//! - it starts from each `Tanh`, `Erf` or tract GELU node;
//! - it takes each value the node depends on through element-wise nodes as a candidate input
//!   `x`, and the nodes that depend only on `x` and scalar constants, element by element and at
//!   `x`'s shape, as the chain;
//! - a chain whose inner values nothing outside reads, and whose output agrees with one of the
//!   two GELU forms to float precision on a probe of values from −10⁴ to 10⁴ (the chain
//!   evaluated by tract's own operators), becomes one [`Gelu`] node.
//!
//! The two forms differ by up to 5e-4 near |x| = 2, far above the tolerance, so a chain cannot
//! match the wrong one; `x · sigmoid(1.702 x)` (the "quick" GELU) matches neither and stays.

use std::collections::{HashMap, HashSet, VecDeque};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Erf, Tanh};
use tract_onnx::tract_core::ops::nn::{GeluApproximate, GeluExact};

use crate::kernels::x86_64::gelu::available;
use crate::ops::f32s;
use crate::ops::gelu::{Gelu, GeluForm};

/// Most element-wise nodes in a chain (the longest spellings have 9).
const MOST_NODES: usize = 16;

/// Replaces every float32 GELU chain by a [`Gelu`] node when this CPU runs the kernel. Returns
/// how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    let mut replaced = 0;
    // Ids stay valid through the patches: tract leaves a replaced chain's nodes in place as
    // `Dummy` nodes without outputs or edges, which are neither anchors nor element-wise, and
    // the new nodes come after every old one, so the order of the old ones still holds.
    let order = model.eval_order()?;
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    for anchor in order {
        if !is_anchor(model.node(anchor)) {
            continue;
        }
        let Some(Chain { x, y, form }) = find_chain(model, anchor, &position)? else { continue };
        let mut patch = TypedModelPatch::default();
        let tapped = patch.tap_model(model, x)?;
        let name = format!("{}.gelu", model.node(y).name);
        let gelu = patch.wire_node(name, Gelu(form), &[tapped])?[0];
        patch.shunt_outside(model, y.into(), gelu)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// A node a GELU chain goes through: a `Tanh` or an `Erf`, or tract's GELU.
fn is_anchor(node: &TypedNode) -> bool {
    node.op_as::<ElementWiseOp>().is_some_and(|ew| {
        let mini = &ew.0;
        mini.is::<Tanh>() || mini.is::<Erf>() || mini.is::<GeluApproximate>() || mini.is::<GeluExact>()
    })
}

/// A GELU chain.
struct Chain {
    /// Its input.
    x: OutletId,
    /// Its last node.
    y: usize,
    form: GeluForm,
}

/// The GELU chain through the node `anchor`, if any; `order` gives each node's place in the
/// evaluation order.
fn find_chain(model: &TypedModel, anchor: usize, order: &HashMap<usize, usize>) -> TractResult<Option<Chain>> {
    let fact = model.outlet_fact(anchor.into())?;
    if fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    for x in candidates(model, anchor)? {
        let input = model.outlet_fact(x)?;
        if input.shape != fact.shape || input.datum_type != f32::datum_type() {
            continue;
        }
        let closure = closure(model, x, order)?;
        for &y in &closure {
            let Some(chain) = chain_to(model, x, y, &closure) else { continue };
            if !chain.contains(&anchor) {
                continue;
            }
            if let Some(form) = probe(model, x, &chain)? {
                return Ok(Some(Chain { x, y, form }));
            }
        }
    }
    Ok(None)
}

/// Whether `node` computes element by element at the shape `shape`: a float32 unary
/// element-wise node, or a binary one (each input then another value or a scalar constant).
fn element_wise(model: &TypedModel, node: &TypedNode, shape: &ShapeFact) -> TractResult<bool> {
    if node.outputs.len() != 1 {
        return Ok(false);
    }
    let out = &node.outputs[0].fact;
    if out.datum_type != f32::datum_type() || out.shape != *shape {
        return Ok(false);
    }
    if node.op_is::<ElementWiseOp>() {
        return Ok(node.inputs.len() == 1);
    }
    if !node.op_is::<TypedBinOp>() || node.inputs.len() != 2 {
        return Ok(false);
    }
    for &input in &node.inputs {
        let fact = model.outlet_fact(input)?;
        let scalar = fact.konst.as_ref().is_some_and(|k| k.len() == 1 && k.datum_type() == f32::datum_type());
        if fact.konst.is_some() && !scalar {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The values `anchor` depends on through element-wise nodes, nearest first: each may be the
/// chain's input.
fn candidates(model: &TypedModel, anchor: usize) -> TractResult<Vec<OutletId>> {
    let shape = &model.node(anchor).outputs[0].fact.shape;
    let (mut found, mut queue, mut seen) = (Vec::new(), VecDeque::from([anchor]), HashSet::new());
    while let Some(id) = queue.pop_front() {
        if found.len() > MOST_NODES {
            break;
        }
        for &input in &model.node(id).inputs {
            if model.outlet_fact(input)?.konst.is_some() || !seen.insert(input) {
                continue;
            }
            found.push(input);
            if element_wise(model, model.node(input.node), shape)? {
                queue.push_back(input.node);
            }
        }
    }
    Ok(found)
}

/// The element-wise nodes whose inputs are `x`, each other's outputs or scalar constants, in
/// evaluation order: the first 4 · [`MOST_NODES`] element-wise nodes reached from `x`, nearest
/// first.
fn closure(model: &TypedModel, x: OutletId, order: &HashMap<usize, usize>) -> TractResult<Vec<usize>> {
    let shape = model.outlet_fact(x)?.shape.clone();
    let mut reached: Vec<usize> = Vec::new();
    let mut frontier = VecDeque::from([x]);
    while let Some(outlet) = frontier.pop_front() {
        for inlet in model.outlet_successors(outlet) {
            let node = model.node(inlet.node);
            if reached.len() < 4 * MOST_NODES && !reached.contains(&node.id) && element_wise(model, node, &shape)? {
                reached.push(node.id);
                frontier.push_back(node.id.into());
            }
        }
    }
    reached.sort_by_key(|n| order.get(n).copied().unwrap_or(usize::MAX));
    let mut inside: Vec<usize> = Vec::new();
    for id in reached {
        let fed = model
            .node(id)
            .inputs
            .iter()
            .all(|&i| i == x || inside.contains(&i.node) || model.outlet_fact(i).is_ok_and(|f| f.konst.is_some()));
        if fed {
            inside.push(id);
        }
    }
    Ok(inside)
}

/// The nodes of `closure` that `y` depends on, in evaluation order, when nothing outside them
/// (no other node, no model output) reads any but `y`, and they read `x`.
fn chain_to(model: &TypedModel, x: OutletId, y: usize, closure: &[usize]) -> Option<Vec<usize>> {
    let mut needed = HashSet::from([y]);
    for &id in closure.iter().rev() {
        if needed.contains(&id) {
            for input in &model.node(id).inputs {
                if closure.contains(&input.node) {
                    needed.insert(input.node);
                }
            }
        }
    }
    if needed.len() > MOST_NODES {
        return None;
    }
    let chain: Vec<usize> = closure.iter().copied().filter(|n| needed.contains(n)).collect();
    let private = chain.iter().filter(|&&n| n != y).all(|&n| {
        !model.outputs.contains(&n.into())
            && model.outlet_successors(n.into()).iter().all(|inlet| needed.contains(&inlet.node))
    });
    let reads_x = chain.iter().any(|&n| model.node(n).inputs.contains(&x));
    (private && reads_x).then_some(chain)
}

/// The GELU form that `chain` computes from `x`, if any: the chain run by tract's operators on
/// a probe of values, against both forms in float64.
fn probe(model: &TypedModel, x: OutletId, chain: &[usize]) -> TractResult<Option<GeluForm>> {
    // A grid over the range where the forms differ, values off it, and far ones (a clamp
    // inside a chain would show there).
    let mut values: Vec<f32> = (0..=400).map(|i| (i as f32 - 200.0) * 0.05).collect();
    values.extend([-1e4, -100.0, -20.0, -12.0, -2.71, -0.33, 0.37, 2.93, 12.0, 20.0, 100.0, 1e4]);
    let rank = model.outlet_fact(x)?.rank().max(1);
    let mut shape = vec![1; rank];
    shape[rank - 1] = values.len();
    let mut known: HashMap<OutletId, TValue> = HashMap::new();
    known.insert(x, Tensor::from_shape(&shape, &values)?.into_tvalue());
    for &id in chain {
        let node = model.node(id);
        let mut inputs = TVec::new();
        for &input in &node.inputs {
            let value = match (known.get(&input), &model.outlet_fact(input)?.konst) {
                (Some(v), _) => v.clone(),
                (None, Some(k)) => k.clone().into_tvalue(),
                (None, None) => return Ok(None),
            };
            inputs.push(value);
        }
        let Ok(Some(out)) = node.op.eval_out_of_plan(inputs) else { return Ok(None) };
        known.insert(id.into(), out[0].clone());
    }
    let last = chain.last().expect("a chain has nodes");
    let out = &known[&OutletId::new(*last, 0)];
    let Ok(got) = f32s(out, "GELU probe") else { return Ok(None) };
    if got.len() != values.len() {
        return Ok(None);
    }
    let agrees = |form| {
        values.iter().zip(got).all(|(&v, &g)| {
            let want = crate::kernels::x86_64::gelu::reference_value(v as f64, form);
            // tract's `Tanh` stops a little short of ±1: far out, `1 + tanh` leaves that gap
            // times |x|.
            (g as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()) + 1e-6 * (v as f64).abs()
        })
    };
    Ok([GeluForm::Tanh, GeluForm::Erf].into_iter().find(|&form| agrees(form)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math::{add, div, erf, mul, tanh};
    use tract_onnx::tract_core::ops::nn::sigmoid;

    type Wire = fn(&mut TypedModel, OutletId) -> TractResult<OutletId>;

    fn scalar(model: &mut TypedModel, name: &str, v: f32) -> TractResult<OutletId> {
        model.add_const(name, tensor2(&[[v]]))
    }

    fn bin(model: &mut TypedModel, op: TypedBinOp, a: OutletId, b: OutletId) -> TractResult<OutletId> {
        let name = format!("n{}", model.nodes().len());
        Ok(model.wire_node(name, op, &[a, b])?[0])
    }

    /// GELU as the legacy exporter writes it: `x · x · x`, constants first.
    fn tanh_by_products(m: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
        let x2 = bin(m, mul(), x, x)?;
        let x3 = bin(m, mul(), x, x2)?;
        let c = scalar(m, "c", 0.044715)?;
        let cx3 = bin(m, mul(), c, x3)?;
        let inner = bin(m, add(), x, cx3)?;
        let k = scalar(m, "k", (2.0 / std::f32::consts::PI).sqrt())?;
        let u = bin(m, mul(), k, inner)?;
        let t = m.wire_node("tanh", tanh(), &[u])?[0];
        let one = scalar(m, "one", 1.0)?;
        let s = bin(m, add(), one, t)?;
        let xs = bin(m, mul(), x, s)?;
        let half = scalar(m, "half", 0.5)?;
        bin(m, mul(), half, xs)
    }

    /// GELU as an erf, `x / √2`, the half last.
    fn erf_by_division(m: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
        let r = scalar(m, "root2", std::f32::consts::SQRT_2)?;
        let z = bin(m, div(), x, r)?;
        let e = m.wire_node("erf", erf(), &[z])?[0];
        let one = scalar(m, "one", 1.0)?;
        let s = bin(m, add(), e, one)?;
        let xs = bin(m, mul(), x, s)?;
        let half = scalar(m, "half", 0.5)?;
        bin(m, mul(), xs, half)
    }

    /// Not a GELU: `x · tanh(x)`.
    fn x_tanh_x(m: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
        let t = m.wire_node("tanh", tanh(), &[x])?[0];
        bin(m, mul(), x, t)
    }

    /// Not a GELU: the "quick" GELU, `x · sigmoid(1.702 x)`, with a `tanh` beside it.
    fn quick_gelu_and_tanh(m: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
        let a = scalar(m, "a", 1.702)?;
        let ax = bin(m, mul(), a, x)?;
        let s = m.wire_node("sigmoid", sigmoid(), &[ax])?[0];
        let q = bin(m, mul(), x, s)?;
        let t = m.wire_node("tanh", tanh(), &[q])?[0];
        bin(m, add(), q, t)
    }

    /// `wire` on an input of 3 × 700, its output and, with `leak`, its `tanh`/`erf` node's
    /// output as a second output: (replaced, max abs difference from tract's run).
    fn run(wire: Wire, leak: bool) -> TractResult<(usize, f32)> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([3, 700]))?;
        let y = wire(&mut model, x)?;
        let mut outputs = vec![y];
        if leak {
            let inner = model.nodes().iter().find(|n| n.name == "tanh" || n.name == "erf").expect("a tanh or erf").id;
            outputs.push(inner.into());
        }
        model.select_output_outlets(&outputs)?;
        let input: Vec<f32> = (0..2100).map(|i| ((i * 37 % 2099) as f32 - 1049.0) / 90.0).collect();
        let inputs = tvec![Tensor::from_shape(&[3, 700], &input)?.into_tvalue()];
        let want = model.clone().into_runnable()?.run(inputs.clone())?;
        let replaced = rewrite(&mut model)?;
        let got = model.into_runnable()?.run(inputs)?;
        let mut worst = 0f32;
        for (w, g) in want.iter().zip(&got) {
            for (a, b) in f32s(w, "want")?.iter().zip(f32s(g, "got")?) {
                worst = worst.max((a - b).abs() / (1.0 + a.abs()));
            }
        }
        Ok((replaced, worst))
    }

    #[test]
    fn chains_of_either_form_become_one_node_and_others_stay() -> TractResult<()> {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return Ok(());
        }
        let cases: [(&str, Wire, bool, usize); 5] = [
            ("tanh form, products", tanh_by_products, false, 1),
            ("erf form, division", erf_by_division, false, 1),
            ("x · tanh(x)", x_tanh_x, false, 0),
            ("quick GELU", quick_gelu_and_tanh, false, 0),
            ("an inner value read outside", tanh_by_products, true, 0),
        ];
        for (what, wire, leak, want) in cases {
            let (replaced, worst) = run(wire, leak)?;
            assert_eq!(replaced, want, "{what}");
            // tract's `Tanh` is a rational fit: `1 + tanh` loses digits in the negative tail.
            assert!(worst < 1e-5, "{what}: difference {worst}");
        }
        Ok(())
    }
}
