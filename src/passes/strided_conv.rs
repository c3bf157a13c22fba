//! Strided convolutions (diffusers' downsamplers) as direct convolutions on our matrix kernel
//! (`crate::ops::direct_conv`).

use tract_onnx::prelude::*;

use crate::kernels::gemm;
use crate::ops::direct_conv::Pointwise;
use crate::ops::packed::Packer;

/// Replaces every float32 strided convolution (stride 2 or more) that [`super::conv_match`] can
/// take by a direct [`Pointwise`] one, when this CPU runs our kernel. Returns how many were
/// replaced.
///
/// tract runs such a convolution as a product over a lazily addressed im2col at batch 1, but
/// copies the whole im2col matrix first at batch 2 (a guided step in one call). Here the input
/// is split once by phase of the stride ([`Phases`]) and each block of 16 output pixels copies
/// its 9c rows from there. That is faster than tract at batch 2 and as fast at batch 1, where
/// it still pays in memory: the weights come packed from the plan file, while tract holds its
/// own packed copy on the heap (on the SD-Turbo UNet, 74 MiB of downsampler weights).
pub(crate) fn rewrite(model: &mut TypedModel, packer: &Packer) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    super::conv_match::rewrite(model, "Pointwise", |f| {
        let op = || {
            Box::new(Pointwise::direct(f.site(packer), f.kernel, f.bias.as_deref(), [f.k, f.c], f.window))
                as Box<dyn TypedOp>
        };
        (f.window.stride > 1).then(op)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::values;
    use crate::ops::f32s;
    use crate::passes::testing::conv;
    use tract_onnx::tract_core::ops::cnn::PaddingSpec;

    /// A graph with a padded, stride-2 3×3 convolution (as exported from PyTorch): the strided
    /// rewrite takes it at any batch, leaves stride-1 ones to the others, and gives
    /// tract's results.
    #[test]
    fn strided_rewrite_matches_tract() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        for (n, [h, w], before, after) in [(1, [16, 16], 1, 1), (2, [16, 16], 1, 1), (3, [9, 12], 0, 1)] {
            let (c, k) = (6, 8);
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([n, c, h, w]))?;
            let kernel = model.add_const("kernel", Tensor::from_shape(&[k, c, 3, 3], &values(k * c * 9, 11))?)?;
            let bias = model.add_const("bias", tensor1(&values(k, 12)))?;
            let mut strided = conv(c, k, Some(tvec![2, 2]));
            strided.pool_spec.kernel_shape = tvec![3, 3];
            strided.pool_spec.padding = PaddingSpec::Explicit(tvec![before; 2], tvec![after; 2]);
            let y = model.wire_node("down", strided, &[x, kernel, bias])?[0];
            let kernel1 = model.add_const("kernel1", Tensor::from_shape(&[k, k, 1, 1], &values(k * k, 13))?)?;
            let bias1 = model.add_const("bias1", tensor1(&values(k, 14)))?;
            let y = model.wire_node("pointwise", conv(k, k, None), &[y, kernel1, bias1])?;
            model.select_output_outlets(&y)?;
            let inputs = tvec![Tensor::from_shape(&[n, c, h, w], &values(n * c * h * w, 15))?.into_tvalue()];
            let want = model.clone().into_optimized()?.into_runnable()?.run(inputs.clone())?;

            let mut ours = model;
            let rewritten = rewrite(&mut ours, &Packer::default())?;
            assert_eq!(rewritten, 1, "n{n} {h}x{w}");
            let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
            assert_eq!(want[0].shape(), got[0].shape());
            let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
            let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "n{n} {h}x{w}: max abs difference {worst}");
        }
        Ok(())
    }
}
