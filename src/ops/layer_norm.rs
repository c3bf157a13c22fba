//! Layer normalization over the last axis of a float32 tensor, with the scale and shift that
//! follow it: `y = (x − mean) / sqrt(var + eps) · s + b` per row, where `s` and `b` (each
//! optional) hold one value per column and may differ between rows of different images.
//!
//! Why: tract imports ONNX's `LayerNormalization` (and finds the same chain in older exports)
//! as a sum, a scaling, a subtraction and its own `RmsNorm` of the difference: four passes over
//! the rows, three of them on one thread. Transformers normalize every block's input this way.
//! Here each row is read twice while in cache (`crate::kernels::group_norm` on a group of one
//! row), and the rows are shared among the threads. The scale and shift are applied while the
//! row is still in cache: a layer norm's own weights, and the per-image modulation of adaLN
//! transformers (DiT, SD3, PixArt: `norm(x) · (1 + scale) + shift`), which tract ran as two more
//! passes over the tensor. `crate::passes::layer_norm` finds the chain.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{f32s, for_each, strided_offset, threads};
use crate::kernels::{carve, group_norm, split};

/// Layer normalization over the last axis, float32; see the module docs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LayerNorm {
    /// Added to the variance.
    pub(crate) eps: f32,
    /// Whether a scale is the next input: one value per column, `x`'s rank, each axis 1 or
    /// `x`'s (the last one `x`'s).
    #[serde(default)]
    pub(crate) scale: bool,
    /// Whether a shift is the next input, shaped as the scale.
    #[serde(default)]
    pub(crate) shift: bool,
}

impl Eq for LayerNorm {}

impl std::hash::Hash for LayerNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.eps.to_bits(), self.scale, self.shift).hash(state);
    }
}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("eps {}, scale {}, shift {}", self.eps, self.scale, self.shift)])
    }

    op_as_typed_op!();
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let row = *x.shape().last().context("LayerNorm: a scalar input")?;
        let xs = f32s(x, "LayerNorm")?;
        let lead = &x.shape()[..x.rank() - 1];
        let mut operands = inputs[1..].iter();
        let mut operand = |wanted: bool| match wanted {
            true => operands.next().map(|t| Columns::of(t, x.shape())).transpose(),
            false => Ok(None),
        };
        let (scale, shift) = (operand(self.scale)?, operand(self.shift)?);
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
                for (r, (x, y)) in rows.zip(xs.chunks_exact(row).zip(ys.chunks_exact_mut(row))) {
                    group_norm(x, y, row, [recip, self.eps], &[1.0], &[0.0]);
                    // A multiplication, then an addition, as tract's two operators did: the
                    // same values to the bit.
                    if let Some(s) = &scale {
                        y.iter_mut().zip(s.row(r, lead)).for_each(|(y, s)| *y *= s);
                    }
                    if let Some(b) = &shift {
                        y.iter_mut().zip(b.row(r, lead)).for_each(|(y, b)| *y += b);
                    }
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

/// A scale or shift operand: one value per column, for the rows of each leading index.
struct Columns<'t> {
    values: &'t [f32],
    /// How far apart the operand's rows are along each leading axis of `x` (0 where it has 1).
    strides: TVec<usize>,
    row: usize,
}

impl<'t> Columns<'t> {
    fn of(t: &'t Tensor, x: &[usize]) -> TractResult<Self> {
        let values = f32s(t, "LayerNorm")?;
        let shape = t.shape();
        let row = *x.last().context("LayerNorm: a scalar input")?;
        ensure!(
            shape.len() == x.len() && shape.last() == Some(&row),
            "LayerNorm: an operand of shape {shape:?} for rows of {x:?}"
        );
        let natural = Tensor::natural_strides(shape);
        let mut strides = TVec::new();
        for ((&d, &n), s) in shape.iter().zip(x).zip(natural.iter()).take(x.len() - 1) {
            ensure!(d == 1 || d == n, "LayerNorm: an operand of shape {shape:?} for rows of {x:?}");
            strides.push(if d == 1 { 0 } else { *s as usize });
        }
        Ok(Columns { values, strides, row })
    }

    /// The operand's values for row `r` of `x` (`lead`: `x`'s leading axes).
    fn row(&self, r: usize, lead: &[usize]) -> &'t [f32] {
        let at = strided_offset(r, lead, &self.strides);
        &self.values[at..at + self.row]
    }
}

impl TypedOp for LayerNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + self.scale as usize + self.shift as usize);
        ensure!(inputs.iter().all(|i| i.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}
