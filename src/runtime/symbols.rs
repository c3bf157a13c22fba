//! Symbolic dimensions: an ONNX file names a dynamic axis (`batch`), and its `value_info`
//! repeats the name on the intermediate values the exporter traced. Once a plan fixes the input
//! shapes, each name has one value, and every fact in the graph must say so: a fact still
//! holding `batch` cannot unify with the `2` that shape inference derives from the input
//! (tract: "Impossible to unify Sym(batch) with Val(2)"), which fails the dynamo exporter's
//! graphs, whose value_info covers nearly every value.

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{DimFact, Factoid, GenericFactoid, InferenceModel, ShapeFactoid};

/// Sets the facts of the graph inputs (`(input index, fact)`) and substitutes, in every fact of
/// the graph, each symbol by the value those inputs give it.
///
/// A symbol that no input fixes names a size the file never ties to an input, so no fact
/// holding it can be checked: such a dimension becomes unknown (the rest of its fact stays),
/// and shape inference computes it from the graph.
pub(super) fn set_inputs(model: &mut InferenceModel, facts: Vec<(usize, InferenceFact)>) -> TractResult<()> {
    let mut values = SymbolValues::default();
    let mut bound: Vec<(Symbol, i64, usize)> = vec![];
    for (ix, fact) in &facts {
        let declared = model.input_fact(*ix)?.clone();
        for (axis, (d, given)) in declared.shape.dims().zip(fact.shape.dims()).enumerate() {
            let (GenericFactoid::Only(TDim::Sym(sym)), Some(v)) = (d, given.concretize()) else { continue };
            let v = v.to_i64()?;
            if let Some((_, was, first)) = bound.iter().find(|(s, _, _)| s == sym) {
                if *was != v {
                    anyhow::bail!("input {first} fixes {sym} to {was}, but input {ix} gives it {v} at axis {axis}");
                }
                continue;
            }
            values.set(sym, v);
            bound.push((sym.clone(), v, *ix));
        }
    }
    for (ix, fact) in facts {
        model.set_input_fact(ix, fact)?;
    }
    for node in model.nodes_mut() {
        for output in &mut node.outputs {
            let shape = &output.fact.shape;
            let dims: TVec<DimFact> = shape.dims().map(|d| substitute(d, &values)).collect();
            output.fact.shape = if shape.is_open() { ShapeFactoid::open(dims) } else { ShapeFactoid::closed(dims) };
        }
    }
    Ok(())
}

fn substitute(d: &DimFact, values: &SymbolValues) -> DimFact {
    match d {
        GenericFactoid::Only(d) => {
            let d = d.eval(values).simplify();
            if d.symbols().is_empty() {
                GenericFactoid::Only(d)
            } else {
                GenericFactoid::Any
            }
        }
        GenericFactoid::Any => GenericFactoid::Any,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_hir::ops::identity::Identity;

    /// `a` [batch, 3] → Identity whose recorded shape (as in value_info) is [batch, 3].
    fn graph() -> (InferenceModel, Symbol) {
        let mut model = InferenceModel::default();
        let batch = model.symbols.sym("batch");
        let fact = || InferenceFact::dt_shape(f32::datum_type(), tvec![batch.to_dim(), 3.to_dim()]);
        let a = model.add_source("a", fact()).unwrap();
        let id = model.wire_node("id", Identity, &[a]).unwrap();
        model.set_outlet_fact(id[0], fact()).unwrap();
        model.select_output_outlets(&id).unwrap();
        (model, batch)
    }

    #[test]
    fn recorded_shapes_take_the_inputs_values() {
        let (mut stale, _) = graph();
        stale.set_input_fact(0, f32::fact([2, 3]).into()).unwrap();
        let err = stale.into_typed().expect_err("the recorded [batch, 3] conflicts with [2, 3]");
        assert!(format!("{err:#}").contains("Impossible to unify"), "{err:#}");

        let (mut model, _) = graph();
        set_inputs(&mut model, vec![(0, f32::fact([2, 3]).into())]).unwrap();
        let typed = model.into_typed().unwrap();
        assert_eq!(typed.output_fact(0).unwrap().shape.as_concrete(), Some(&[2, 3][..]));
    }

    #[test]
    fn one_symbol_two_values_is_an_error() {
        let (mut model, batch) = graph();
        model.add_source("b", InferenceFact::dt_shape(f32::datum_type(), tvec![batch.to_dim()])).unwrap();
        let err = set_inputs(&mut model, vec![(0, f32::fact([2, 3]).into()), (1, f32::fact([1]).into())]);
        assert!(err.unwrap_err().to_string().contains("fixes batch to 2"));
    }
}
