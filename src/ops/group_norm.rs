//! GroupNorm with its affine as one operator.
//!
//! Why: PyTorch exports `GroupNorm` as Reshape → InstanceNormalization → Reshape → Mul γ →
//! Add β, which tract declutters into eight nodes: a sum (`Reduce<Sum>`), a multiply by 1/L,
//! a subtraction, `RmsNorm`, a reshape back and the affine. Its sum and `RmsNorm` add their
//! elements one after the other (scalar, a dependency chain), and each node makes another pass
//! over the tensor; together these nodes were a large part of a call. The
//! [`GroupNorm`] operator makes three passes over each group (sum, centered sum of squares,
//! normalize with the affine), with 16 partial sums the compiler vectorizes.
//!
//! A SiLU right after the norm (diffusers' ResNet blocks: norm → SiLU → convolution) runs
//! inside the operator, on each group while it is still in L1, with tract's own SiLU kernel
//! (the same results as tract's `Silu` node): one pass over the tensor and one node fewer.
//!
//! `crate::passes::group_norm` swaps the pattern for the operator in a decluttered graph, before
//! tract optimizes it. Float32 only. The sums' order differs from tract's, so results differ from
//! tract's in the last bits (relative 1e-7 of a group's mean and spread).

use tract_linalg::routines::Func;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::scratch::{output, recycle};
use super::{f32s, for_each};
use crate::kernels;

/// `y = (x − mean) / sqrt(var + eps) · γ + β` over each group of `c / groups` channels of a
/// float32 `[n, c, h, w]` tensor; mean = Σx · `recip`, var = Σ(x − mean)² / L (L: elements of
/// a group), as in the decluttered graph it replaces; then `y · sigmoid(y)` when `silu`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupNorm {
    pub(crate) groups: usize,
    pub(crate) recip: f32,
    pub(crate) eps: f32,
    #[serde(with = "super::serial::tensor::floats")]
    pub(crate) gamma: Vec<f32>,
    #[serde(with = "super::serial::tensor::floats")]
    pub(crate) beta: Vec<f32>,
    pub(crate) silu: bool,
}

impl Eq for GroupNorm {}

impl std::hash::Hash for GroupNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.groups.hash(state);
        self.recip.to_bits().hash(state);
        self.eps.to_bits().hash(state);
        self.silu.hash(state);
        self.gamma.iter().chain(&self.beta).for_each(|v| v.to_bits().hash(state));
    }
}

impl Op for GroupNorm {
    fn name(&self) -> StaticName {
        "GroupNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let silu = if self.silu { ", then SiLU" } else { "" };
        Ok(vec![format!(
            "{} groups of {} channels, eps {}{silu}",
            self.groups,
            self.gamma.len() / self.groups,
            self.eps
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GroupNorm {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let &[n, c, h, w] = x.shape() else { bail!("GroupNorm expects NCHW, got {:?}", x.shape()) };
        ensure!(c == self.gamma.len(), "GroupNorm expects {} channels, got {c}", self.gamma.len());
        let xs = f32s(&x, "GroupNorm")?;
        let mut y = output(ctx, &[n, c, h, w])?;
        let mut ys = y.try_as_plain_ram_mut()?;
        let ys = ys.as_slice_mut::<f32>()?;
        self.run(xs, ys, h * w)?;
        recycle(ctx, x);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for GroupNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].rank() == 4 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}

impl GroupNorm {
    /// `x`, `y`: `[n, c, h·w]`, C order; `plane`: h·w. The groups are split between the plan's
    /// threads; each group's arithmetic is the same on any thread count.
    pub(crate) fn run(&self, x: &[f32], y: &mut [f32], plane: usize) -> TractResult<()> {
        let len = self.gamma.len() / self.groups * plane;
        let silu = if self.silu { Some(Func::Silu.ew_f32()?) } else { None };
        let failed = std::sync::Mutex::new(None);
        let work: Vec<_> = x.chunks_exact(len).zip(y.chunks_exact_mut(len)).enumerate().collect();
        let per_group = self.gamma.len() / self.groups;
        for_each(work, |(gi, (xg, yg))| {
            let channels = (gi % self.groups) * per_group..(gi % self.groups + 1) * per_group;
            let (gamma, beta) = (&self.gamma[channels.clone()], &self.beta[channels]);
            kernels::group_norm(xg, yg, plane, [self.recip, self.eps], gamma, beta);
            if let Some(Err(e)) = silu.as_ref().map(|silu| silu.run(yg)) {
                *failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e);
            }
        });
        match failed.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            Some(e) => Err(e.context("GroupNorm: SiLU")),
            None => Ok(()),
        }
    }
}
