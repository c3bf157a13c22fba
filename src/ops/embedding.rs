//! A lookup table by constant weights: the rows of a `[rows, dim]` table picked by integer ids,
//! as ONNX `Gather` on axis 0 does for a text encoder's token embedding. Ours reads its table
//! from [`Packed`] weights, so that a plan file serves it through the map: a prompt touches a
//! few dozen rows of a table of tens of thousands, and only their pages are ever read.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::packed::{Packed, Site};

#[derive(Debug, Clone, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Embedding {
    table: Packed,
    rows: usize,
    dim: usize,
}

impl Embedding {
    /// The operator over a row-major `[rows, dim]` table, for the node `site` names.
    pub(crate) fn new_in(site: Site, table: &[f32], [rows, dim]: [usize; 2]) -> Self {
        Embedding { table: site.get("embedding", table, || table.to_vec()), rows, dim }
    }

    /// The rows of `ids` one after another into `out` (`ids.len() · dim` values).
    fn lookup(&self, ids: &[i64], out: &mut [f32]) -> TractResult<()> {
        ensure!(out.len() == ids.len() * self.dim, "Embedding: short output");
        let table = self.table.floats();
        let mut wide = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let r = self.row(id)?;
            out[i * self.dim..][..self.dim].copy_from_slice(table.widen(r * self.dim..(r + 1) * self.dim, &mut wide));
        }
        Ok(())
    }

    /// Row of `id` (negative: from the end, as ONNX `Gather`), or an error naming it.
    fn row(&self, id: i64) -> TractResult<usize> {
        let row = if id < 0 { id + self.rows as i64 } else { id };
        ensure!((0..self.rows as i64).contains(&row), "Embedding: id {id} outside a table of {} rows", self.rows);
        Ok(row as usize)
    }
}

impl Op for Embedding {
    fn name(&self) -> StaticName {
        "Embedding".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} rows of {}, {:?}", self.rows, self.dim, self.table)])
    }

    op_as_typed_op!();
}

impl EvalOp for Embedding {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.table.prefetch_next();
        let ids = args_1!(inputs);
        let mut shape: TVec<usize> = ids.shape().into();
        shape.push(self.dim);
        let ids = ids.cast_to::<i64>()?;
        let ids = ids.try_as_plain_ram()?;
        let ids = ids.as_slice::<i64>()?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        self.lookup(ids, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?)?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Embedding {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type.is_integer(), "Embedding: ids of {:?}", inputs[0].datum_type);
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape.push(self.dim.into());
        Ok(tvec!(f32::fact(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::packed::Packer;

    #[test]
    fn rows_by_id_as_onnx_gather_and_out_of_range_ids_refused() {
        let table: Vec<f32> = (0..5 * 3).map(|i| i as f32 * 0.5 + 0.1).collect();
        for half in [false, true] {
            let packer = Packer::default();
            packer.set_half(half);
            let op = Embedding::new_in(Site { packer: &packer, node: "e", origin: None }, &table, [5, 3]);
            let mut out = vec![0f32; 4 * 3];
            op.lookup(&[0, 4, -1, 2], &mut out).unwrap();
            let want: Vec<f32> = [0, 4, 4, 2].iter().flat_map(|&r| table[r * 3..][..3].to_vec()).collect();
            let want: Vec<f32> =
                if half { want.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() } else { want };
            assert_eq!(out, want, "half {half}");
            for bad in [5, -6] {
                let err = op.lookup(&[bad], &mut out[..3]).unwrap_err().to_string();
                assert!(err.contains(&format!("id {bad}")), "{err}");
            }
        }
    }
}
