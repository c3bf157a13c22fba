//! 1×1 convolutions on our matrix kernel (the operator and why: `crate::ops::direct_conv`),
//! swapped in *before* tract declutters the graph, which would turn them into forms tract runs
//! slower.

use tract_onnx::prelude::*;

use crate::kernels::gemm;
use crate::kernels::Window;
use crate::ops::direct_conv::Pointwise;
use crate::ops::packed::Packer;

/// Replaces every float32, 1×1, stride-1, unpadded, ungrouped NCHW convolution with constant
/// weights by a [`Pointwise`] node, when this CPU runs our kernel. Returns how many were
/// replaced. The bias may be a computed input of `k` values.
pub(crate) fn rewrite(model: &mut TypedModel, packer: &Packer) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    super::conv_match::rewrite(model, "Pointwise", |f| {
        let op = || {
            Box::new(Pointwise::direct(f.site(packer), f.kernel, f.bias.as_deref(), [f.k, f.c], f.window))
                as Box<dyn TypedOp>
        };
        (f.window == Window::square(1, 0)).then(op)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::values;
    use crate::ops::f32s;
    use crate::passes::testing::conv;

    /// A 1×1 convolution, with a computed `[1, k, 1, 1]` tensor added after it when `computed`,
    /// run by tract and rewritten (before declutter, as the runtime does).
    fn check(n: usize, c: usize, k: usize, [h, w]: [usize; 2], computed: bool) -> TractResult<()> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([n, c, h, w]))?;
        let kernel = model.add_const("kernel", Tensor::from_shape(&[k, c, 1, 1], &values(k * c, 1))?)?;
        let bias = model.add_const("bias", tensor1(&values(k, 2)))?;
        let mut y = model.wire_node("conv", conv(c, k, None), &[x, kernel, bias])?[0];
        let mut inputs = tvec![Tensor::from_shape(&[n, c, h, w], &values(n * c * h * w, 3))?.into_tvalue()];
        if computed {
            let t = model.add_source("t", f32::fact([1, k, 1, 1]))?;
            y = model.wire_node("add", tract_onnx::tract_core::ops::math::add(), &[y, t])?[0];
            inputs.push(Tensor::from_shape(&[1, k, 1, 1], &values(k, 4))?.into_tvalue());
        }
        model.select_output_outlets(&[y])?;
        let want = model.clone().into_optimized()?.into_runnable()?.run(inputs.clone())?;

        let mut ours = model;
        assert_eq!(rewrite(&mut ours, &Packer::default())?, 1, "not rewritten: n{n} c{c} k{k} {h}x{w}");
        let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
        let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
        assert_eq!(want.len(), got.len());
        let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "n{n} c{c} k{k} {h}x{w}: max abs difference {worst}");
        Ok(())
    }

    #[test]
    fn matches_tract_around_the_block_edges() -> TractResult<()> {
        if !gemm::available() {
            eprintln!("no AVX2 and FMA here: the kernel cannot run");
            return Ok(());
        }
        // Pixel counts around the 16-pixel blocks, channel counts around the 6-channel panels.
        check(1, 32, 64, [8, 8], false)?;
        check(1, 96, 32, [32, 32], true)?;
        check(2, 7, 13, [5, 3], true)?;
        check(3, 1, 1, [1, 17], false)
    }

    #[test]
    fn leaves_strided_convolutions_alone() -> TractResult<()> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 8, 8]))?;
        let w = model.add_const("w", Tensor::zero::<f32>(&[4, 4, 1, 1])?)?;
        let b = model.add_const("b", Tensor::zero::<f32>(&[4])?)?;
        let y = model.wire_node("strided", conv(4, 4, Some(tvec![2, 2])), &[x, w, b])?;
        model.select_output_outlets(&y)?;
        let mut model = model;
        assert_eq!(rewrite(&mut model, &Packer::default())?, 0);
        Ok(())
    }
}
