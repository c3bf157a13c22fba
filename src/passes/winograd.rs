//! Winograd F(2×2, 3×3) for the 3×3, stride-1, padding-1 convolutions (the operator and why:
//! `crate::ops::winograd3x3`); on x86-64, large layers on small maps as direct convolutions
//! instead.

use tract_onnx::prelude::*;

#[cfg(own_gemm)]
use crate::kernels::gemm;
use crate::kernels::Window;
#[cfg(own_gemm)]
use crate::ops::direct_conv::Pointwise;
use crate::ops::packed::Packer;
use crate::ops::winograd3x3::Winograd3x3;
#[cfg(own_gemm)]
use crate::ops::winograd3x3::LARGE;

/// Whether this CPU has a fast matrix product for the 16 products: our kernel or
/// `matrixmultiply`'s AVX2+FMA one on x86-64, ours or `matrixmultiply`'s NEON one on aarch64;
/// on 32-bit ARM only our NEON kernel, since `matrixmultiply` has only a generic kernel there and
/// tract's own NEON kernels are faster than that.
pub(crate) fn pays_off() -> bool {
    #[cfg(target_arch = "arm")]
    return gemm::available();
    #[cfg(not(target_arch = "arm"))]
    cfg!(any(target_arch = "x86_64", target_arch = "aarch64"))
}

/// Replaces every float32 3×3, stride-1, padding-1, ungrouped NCHW convolution with constant
/// weights by a [`Winograd3x3`] node. Returns how many were replaced.
///
/// The bias may be computed: tract folds a per-channel add after a convolution into its bias
/// (diffusers' ResNet blocks add the time embedding right after `conv1`), and such a node then
/// takes the bias as its second input.
///
/// On x86-64, large layers on small maps go to [`Pointwise`] instead, as direct convolutions:
/// see [`direct_pays`]. Nothing where the CPU has no fast product ([`pays_off`]).
pub(crate) fn rewrite(model: &mut TypedModel, packer: &Packer) -> TractResult<usize> {
    if !pays_off() {
        return Ok(0);
    }
    super::conv_match::rewrite(model, "Winograd3x3", |f| -> Option<Box<dyn TypedOp>> {
        if f.window != Window::square(3, 1) {
            return None;
        }
        #[cfg(own_gemm)]
        if direct_pays(f.k, f.c, f.map) {
            return Some(Box::new(Pointwise::direct(
                f.site(packer),
                f.kernel,
                f.bias.as_deref(),
                [f.k, f.c],
                f.window,
            )));
        }
        Some(Box::new(Winograd3x3::new_in(f.site(packer), f.kernel, f.bias.as_deref(), f.k, f.c)))
    })
}

/// Whether a 3×3 convolution of `k` × `c` channels over an `h` × `w` map runs faster as a
/// direct convolution on our kernel (`Pointwise`: 9 products per pixel and channel pair) than
/// by Winograd: for large layers (see [`LARGE`]) on maps of at most [`SMALL`] pixels. Such a
/// layer reads its weights from memory on every call (the 35.7M UNet's do not fit in L3
/// together), F(2×2) 16·k·c of them and the direct convolution 9·k·c; and on a 4×4 map
/// F(2×2)'s 4 tiles fill only a quarter of a 16-tile block, so it does 16 products per pixel
/// against 9.
///
/// Measured on the 35.7M UNet: faster directly on its 4×4 maps; on its 8×8 maps the direct
/// convolution was slower (also with each panel of weights read once for 4 blocks), hence
/// [`SMALL`].
#[cfg(own_gemm)]
fn direct_pays(k: usize, c: usize, [h, w]: [usize; 2]) -> bool {
    gemm::available() && 16 * k * c > LARGE && h * w <= SMALL
}

/// See [`direct_pays`].
#[cfg(own_gemm)]
const SMALL: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;
    use crate::ops::f32s;
    use crate::passes::testing::conv3x3;

    /// A convolution followed by a per-channel add of a computed `[1, k, 1, 1]` tensor (the
    /// time embedding of diffusers' ResNet blocks): tract folds the add into the bias, and the
    /// rewrite must still take the node, with the bias as its second input.
    #[test]
    fn a_computed_bias_becomes_an_input() -> TractResult<()> {
        let (c, k, h, w) = (4, 5, 6, 7);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, c, h, w]))?;
        let t = model.add_source("t", f32::fact([1, k, 1, 1]))?;
        let kernel = model.add_const("kernel", Tensor::from_shape(&[k, c, 3, 3], &random(k * c * 9, 11))?)?;
        let bias = model.add_const("bias", tensor1(&random(k, 12)))?;
        let y = model.wire_node("conv", conv3x3(c, k), &[x, kernel, bias])?[0];
        let y = model.wire_node("add", tract_onnx::tract_core::ops::math::add(), &[y, t])?[0];
        model.select_output_outlets(&[y])?;
        let inputs = tvec![
            Tensor::from_shape(&[1, c, h, w], &random(c * h * w, 13))?.into_tvalue(),
            Tensor::from_shape(&[1, k, 1, 1], &random(k, 14))?.into_tvalue(),
        ];
        let want = model.clone().into_runnable()?.run(inputs.clone())?;

        let mut ours = model.into_decluttered()?;
        let rewritten = rewrite(&mut ours, &Packer::default())?;
        if !pays_off() {
            assert_eq!(rewritten, 0, "Winograd without a fast product");
            return Ok(());
        }
        assert_eq!(rewritten, 1);
        let node = ours.nodes().iter().find(|n| n.op_is::<Winograd3x3>()).expect("a Winograd node");
        assert_eq!(node.inputs.len(), 2, "the bias should be an input: {node}");
        let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
        let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
        let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "max abs difference {worst}");
        Ok(())
    }

    /// A large layer on a 4×4 map becomes a direct convolution (`Pointwise`), on an 8×8 map a
    /// Winograd one; both match tract's own result.
    #[cfg(own_gemm)]
    #[test]
    fn large_layers_on_small_maps_run_directly() -> TractResult<()> {
        if !gemm::available() {
            eprintln!("no AVX2 and FMA here: the direct convolution cannot run");
            return Ok(());
        }
        let (k, c) = (130, 129);
        assert!(16 * k * c > LARGE);
        for (side, direct) in [(4, true), (8, false)] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([2, c, side, side]))?;
            let kernel = model.add_const("kernel", Tensor::from_shape(&[k, c, 3, 3], &random(k * c * 9, 21))?)?;
            let bias = model.add_const("bias", tensor1(&random(k, 22)))?;
            let y = model.wire_node("conv", conv3x3(c, k), &[x, kernel, bias])?;
            model.select_output_outlets(&y)?;
            let inputs =
                tvec![Tensor::from_shape(&[2, c, side, side], &random(2 * c * side * side, 23))?.into_tvalue()];
            let want = model.clone().into_runnable()?.run(inputs.clone())?;
            let mut ours = model.into_decluttered()?;
            assert_eq!(rewrite(&mut ours, &Packer::default())?, 1);
            let pointwise = ours.nodes().iter().any(|n| n.op_is::<Pointwise>());
            assert_eq!(pointwise, direct, "{side}x{side} map");
            let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
            let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
            let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-4, "{side}x{side}: max abs difference {worst}");
        }
        Ok(())
    }
}
