//! Softmax over the last axis of a float32 tensor, on x86-64 with AVX2 and FMA, and on aarch64.
//!
//! Why: the UNets' attention takes a softmax over rows of 64 scores (4 heads × 64 queries at
//! an 8×8 map). tract 0.23 has no row kernel on x86-64 and runs three kernel calls per row
//! (max, exp-and-sum, scale), each through its alignment wrapper. Here each row is one pass for
//! the maximum and one for the exponentials and their sum, then a scale
//! (`crate::kernels::softmax_row_in_place`: 8 lanes on x86-64, 2 × 4 on aarch64).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{f32s, for_each, threads};
use crate::kernels::{carve, softmax_available, softmax_row_in_place, split};

/// Softmax over the last axis, float32; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RowSoftmax;

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let row = *x.shape().last().context("RowSoftmax: a scalar input")?;
        ensure!(softmax_available(), "RowSoftmax: this CPU lacks the kernel's features");
        f32s(&x, "RowSoftmax")?;
        // In place when this op holds the only reference (attention's scores: no second tensor
        // of that size to allocate and fault in); tract copies the input otherwise.
        let mut y = x.into_tensor();
        let mut out = y.try_as_plain_ram_mut()?;
        let out = out.as_slice_mut::<f32>()?;
        if let Some(rows) = out.len().checked_div(row) {
            let ranges = split(rows, threads());
            let pieces = carve(out, ranges.iter().map(|r| r.len() * row));
            for_each(pieces, |y| {
                // Safety: `softmax_available` (ensured above).
                y.chunks_exact_mut(row).for_each(|r| unsafe { softmax_row_in_place(r) });
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}
