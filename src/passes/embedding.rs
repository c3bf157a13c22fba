//! Lookup tables by constant weights (a text encoder's token embedding, exported as `Gather` on
//! axis 0 of a `[rows, dim]` initializer) as our [`Embedding`] operator, which reads its table
//! through the plan file's map: a prompt's few dozen rows are all it touches. Swapped in before
//! declutter, while the table is still the initializer itself.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::Gather;

use crate::ops::embedding::Embedding;
use crate::ops::f32s;
use crate::ops::packed::{Packer, Site};

/// Replaces every `Gather` on axis 0 of a constant float32 `[rows, dim]` table by computed
/// integer ids with an [`Embedding`] node. Returns how many were replaced.
pub(crate) fn rewrite(model: &mut TypedModel, packer: &Packer) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(gather) = node.op_as::<Gather>() else { continue };
        if gather.axis != 0 || gather.output_type.is_some() || node.inputs.len() != 2 {
            continue;
        }
        let (table, ids) = (model.outlet_fact(node.inputs[0])?, model.outlet_fact(node.inputs[1])?);
        let Some(values) = table.konst.clone() else { continue };
        let &[rows, dim] = values.shape() else { continue };
        if values.datum_type() != f32::datum_type() || ids.konst.is_some() || !ids.datum_type.is_integer() {
            continue;
        }
        let name = node.name.clone();
        let site = Site { packer, node: &name, origin: super::origin(model, node.inputs[0]) };
        // Read in place: a table held with other strides is left to tract.
        let Ok(source) = f32s(&values, "Embedding") else { continue };
        let op = Embedding::new_in(site, source, [rows, dim]);
        let node = model.node(id);
        TypedModelPatch::replace_single_op(model, node, &node.inputs[1..], op)?.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    /// A token embedding as exported (`Gather` of an initializer by int64 ids, then a bias), run
    /// by tract and rewritten: the same bits, negative ids included.
    #[test]
    fn a_gathered_table_gives_tract_s_bits() -> TractResult<()> {
        let (rows, dim) = (50, 8);
        let mut model = TypedModel::default();
        let ids = model.add_source("ids", i64::fact([2, 3]))?;
        let table = model.add_const("table", Tensor::from_shape(&[rows, dim], &random(rows * dim, 1))?)?;
        let y = model.wire_node("gather", Gather::new(0), &[table, ids])?[0];
        let bias = model.add_const("bias", Tensor::from_shape(&[1, 1, dim], &random(dim, 2))?)?;
        let y = model.wire_node("add", tract_onnx::tract_core::ops::math::add(), &[y, bias])?;
        model.select_output_outlets(&y)?;
        let inputs = tvec![Tensor::from_shape(&[2, 3], &[0i64, 49, 7, -1, 3, 3])?.into_tvalue()];
        let want = model.clone().into_optimized()?.into_runnable()?.run(inputs.clone())?;
        let mut ours = model;
        assert_eq!(rewrite(&mut ours, &Packer::default())?, 1);
        let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
        assert_eq!(want[0].shape(), got[0].shape());
        assert_eq!(f32s(&want[0], "want")?, f32s(&got[0], "got")?);
        Ok(())
    }
}
