//! GELU as one element-wise pass, on x86-64 with AVX2 and FMA (`crate::kernels::x86_64::gelu`).
//!
//! Why: exports spell GELU as a chain of 7 to 9 element-wise nodes (a cube or a `Pow`, scales,
//! a `Tanh` or an `Erf`, a `1 +`, two products). tract runs most of them as separate passes
//! over a transformer's widest activation (tokens × 4 hidden), none of them on a second
//! thread; in a DiT block that chain cost about as much as the block's attention.
//! `crate::passes::gelu` finds the chains whatever their spelling.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{f32s, for_each, threads};
pub(crate) use crate::kernels::x86_64::gelu::GeluForm;
use crate::kernels::x86_64::gelu::{available, gelu_in_place};
use crate::kernels::{carve, split};

/// Fewest elements per thread: below this, waking another thread costs more than it saves.
const LEAST_SHARE: usize = 16 * 1024;

/// `y = GELU(x)`, float32, element by element; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Gelu(pub GeluForm);

impl Op for Gelu {
    fn name(&self) -> StaticName {
        "Gelu".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} form", self.0)])
    }

    op_as_typed_op!();
}

impl EvalOp for Gelu {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(available(), "Gelu: this CPU lacks AVX2 or FMA");
        f32s(&x, "Gelu")?;
        // In place when this op holds the only reference, as the chain's last node did.
        let mut y = x.into_tensor();
        let mut plain = y.try_as_plain_ram_mut()?;
        let out = plain.as_slice_mut::<f32>()?;
        // Shares of whole vectors of 8, the last one taking the tail.
        let parts = threads().min(out.len() / LEAST_SHARE).max(1);
        let vectors = split(out.len() / 8, parts);
        let len = out.len();
        let pieces = carve(out, vectors.iter().map(|r| if r.end == len / 8 { len - r.start * 8 } else { r.len() * 8 }));
        let form = self.0;
        // Safety: `available` (ensured above).
        for_each(pieces, |piece| unsafe { gelu_in_place(piece, form) });
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Gelu {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "Gelu: a float32 input");
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    // Element by element, as tract's element-wise operators: its optimizer may move axis
    // changes through the node.
    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }
}
