//! Layer normalization over the last axis of a float32 tensor, without scale or shift:
//! `y = (x − mean) / sqrt(var + eps)` per row.
//!
//! Why: tract imports ONNX's `LayerNormalization` (and finds the same chain in older exports)
//! as a sum, a scaling, a subtraction and its own `RmsNorm` of the difference: four passes over
//! the rows, three of them on one thread. Transformers normalize every block's input this way.
//! Here each row is read twice while in cache (`crate::kernels::group_norm` on a group of one
//! row), and the rows are shared among the threads. A scale and shift that follow stay tract's.
//! `crate::passes::layer_norm` finds the chain.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{f32s, for_each, threads};
use crate::kernels::{carve, group_norm, split};

/// Layer normalization over the last axis, float32; see the module docs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LayerNorm {
    /// Added to the variance.
    pub(crate) eps: f32,
}

impl Eq for LayerNorm {}

impl std::hash::Hash for LayerNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.eps.to_bits().hash(state);
    }
}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("eps {}", self.eps)])
    }

    op_as_typed_op!();
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let row = *x.shape().last().context("LayerNorm: a scalar input")?;
        let xs = f32s(&x, "LayerNorm")?;
        // Every element is written below, row by row.
        let mut y = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        if let Some(rows) = xs.len().checked_div(row) {
            let mut out = y.try_as_plain_ram_mut()?;
            let out = out.as_slice_mut::<f32>()?;
            let ranges = split(rows, threads());
            let pieces = carve(out, ranges.iter().map(|r| r.len() * row));
            let recip = 1.0 / row as f32;
            for_each(ranges.into_iter().zip(pieces).collect(), |(rows, ys)| {
                let xs = &xs[rows.start * row..rows.end * row];
                for (x, y) in xs.chunks_exact(row).zip(ys.chunks_exact_mut(row)) {
                    group_norm(x, y, row, [recip, self.eps], &[1.0], &[0.0]);
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for LayerNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}
