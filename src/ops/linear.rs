//! Linear layers (a product by constant weights, plus a constant bias) on our matrix kernel, on
//! x86-64 with AVX2 and FMA.
//!
//! Why: a transformer's call is mostly its linear layers: `[tokens, c] × [c, k]` with constant
//! weights (the attention projections, the MLPs, the adaLN modulations). tract runs them on its
//! general product, which packs the activations on every call, and adds the bias in another
//! node. Here the weights are packed once at load (`gemm::pack_weights`), each block of 16 rows
//! of activations is gathered once into the c × 16 layout the kernel reads, each group of panels
//! of output features runs over all the blocks while its weights are in cache, and the bias
//! starts the sums. The kernel computes `Yᵀ` a block at a
//! time, so a token-major output is written through strides.
//!
//! `crate::passes::linear` finds the `EinSum`s and the bias `Add`s. Float32; the sums add the
//! input features in order, one fused multiply-add at a time.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{f32s, for_each, strided_offset, threads, Output};
use crate::kernels::x86_64::gemm::{self, MOST, MR, NR};
use crate::kernels::{carve, split};

/// Where the rows, the input features and the output features are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LinearAxes {
    /// The input's axes that the output keeps, in the input's order: the rows. Its other axes
    /// than these and `features` have one element.
    pub rows: TVec<usize>,
    /// The input's feature axis (c).
    pub features: usize,
    /// What each axis of the output is.
    pub out: TVec<OutAxis>,
}

/// An axis of a [`Linear`] output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OutAxis {
    /// `rows[i]` of the input.
    Row(usize),
    /// The output features (k).
    Features,
    /// An axis of one element that the input does not have.
    One,
}

/// `y = x · W + b` over the feature axis; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Linear {
    pub(crate) k: usize,
    pub(crate) c: usize,
    pub(crate) axes: LinearAxes,
    /// `W` as k × c, packed for the kernel.
    pub(crate) weights: Arc<Tensor>,
    /// `k` values; zeros when the layer has none.
    pub(crate) bias: Arc<Tensor>,
}

impl Linear {
    /// `weights` holds W with element (output feature f, input feature i) at
    /// `f · strides[0] + i · strides[1]`.
    pub(crate) fn new(
        weights: &[f32],
        strides: [usize; 2],
        bias: Option<&[f32]>,
        [k, c]: [usize; 2],
        axes: LinearAxes,
    ) -> Self {
        let mut packed = vec![0f32; gemm::packed_len(k, c)];
        gemm::pack_strided(weights, k, c, strides, &mut packed);
        let bias = bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; k]);
        Linear { k, c, axes, weights: Arc::new(tensor1(&packed)), bias: Arc::new(tensor1(&bias)) }
    }

    fn output_shape<D: Clone>(&self, x: &[D], k: D, one: D) -> TVec<D> {
        self.axes
            .out
            .iter()
            .map(|axis| match axis {
                OutAxis::Row(i) => x[self.axes.rows[*i]].clone(),
                OutAxis::Features => k.clone(),
                OutAxis::One => one.clone(),
            })
            .collect()
    }

    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        ensure!(gemm::available(), "Linear: this CPU lacks AVX2 and FMA");
        ensure!(
            x.shape()[self.axes.features] == self.c,
            "Linear: {} input features, not {}",
            x.shape()[self.axes.features],
            self.c
        );
        let shape = self.output_shape(x.shape(), self.k, 1);
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let xs = f32s(x, "Linear")?;
        let natural = Tensor::natural_strides(x.shape());
        let dims: TVec<usize> = self.axes.rows.iter().map(|&a| x.shape()[a]).collect();
        let x_strides: TVec<usize> = self.axes.rows.iter().map(|&a| natural[a] as usize).collect();
        let x_feature = natural[self.axes.features] as usize;
        let natural_y = Tensor::natural_strides(&shape);
        let (mut y_strides, mut y_feature) = (tvec![0usize; dims.len()], 0);
        for (axis, role) in self.axes.out.iter().enumerate() {
            match role {
                OutAxis::Row(i) => y_strides[*i] = natural_y[axis] as usize,
                OutAxis::Features => y_feature = natural_y[axis] as usize,
                OutAxis::One => (),
            }
        }
        let (k, c) = (self.k, self.c);
        let t: usize = dims.iter().product();
        if t * k == 0 {
            return Ok(y);
        }
        let u = f32s(&self.weights, "Linear")?;
        let bias = f32s(&self.bias, "Linear")?;
        let (blocks, panels) = (t.div_ceil(NR), k.div_ceil(MR));
        // Every block of 16 rows gathered once, as c rows of 16 (zero past the last row).
        let mut gathered = vec![0f32; blocks * c * NR];
        let parts = threads();
        let shares = split(blocks, parts);
        let pieces = carve(&mut gathered, shares.iter().map(|r| r.len() * c * NR));
        for_each(shares.into_iter().zip(pieces).collect(), |(share, piece)| {
            for (b, block) in share.zip(piece.chunks_exact_mut(c * NR)) {
                let t0 = b * NR;
                for j in 0..NR.min(t - t0) {
                    let at = strided_offset(t0 + j, &dims, &x_strides);
                    for (i, row) in block.chunks_exact_mut(NR).enumerate() {
                        row[j] = xs[at + i * x_feature];
                    }
                }
            }
        });
        // Work items: (group of panels, share of the blocks). A group's weights are read from
        // memory once and stay in cache while it runs over its blocks, which are in L2: with
        // the blocks outermost, every block streamed all the weights again.
        let groups = panels.div_ceil(MOST);
        let splits = parts.div_ceil(groups).min(blocks);
        let ranges = split(groups * splits, parts);
        let mut plain = y.try_as_plain_ram_mut()?;
        let ys = plain.as_slice_mut::<f32>()?;
        let out = Output(ys.as_mut_ptr(), ys.len());
        let kernel = gemm::Kernel::detect();
        let gathered = &gathered;
        for_each(ranges, |items| {
            let mut acc = [0f32; MOST * MR * NR];
            for item in items {
                let (g, part) = (item / splits, item % splits);
                let (lo, hi) = (g * MOST, ((g + 1) * MOST).min(panels));
                let height = (hi * MR).min(k) - lo * MR;
                for b in part * blocks / splits..(part + 1) * blocks / splits {
                    let (t0, width) = (b * NR, NR.min(t - b * NR));
                    // Safety: `available()` above and the detected kernel; c rows of NR in the
                    // block, the panels of `u`, `bias` of k, and room for MOST panels' rows of
                    // NR in `acc`.
                    unsafe {
                        let rows = &gathered[b * c * NR..][..c * NR];
                        gemm::block(kernel, u, [k, c], lo..hi, rows, NR, acc.as_mut_ptr(), NR, Some(bias))
                    };
                    for j in 0..width {
                        let at = strided_offset(t0 + j, &dims, &y_strides) + lo * MR * y_feature;
                        for f in 0..height {
                            let i = at + f * y_feature;
                            assert!(i < out.len(), "Linear: short output");
                            // Safety: inside `y` (asserted); only this item writes these rows'
                            // features.
                            unsafe { *out.at(i) = acc[f * NR + j] };
                        }
                    }
                }
            }
        });
        Ok(y)
    }
}

impl Op for Linear {
    fn name(&self) -> StaticName {
        "Linear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} -> {} features", self.c, self.k)])
    }

    op_as_typed_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        Ok(tvec!(self.run(&x)?.into_tvalue()))
    }
}

impl TypedOp for Linear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape, self.k.to_dim(), 1.to_dim()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 41 % 31) as f32 - 15.0) / 11.0).collect()
    }

    /// `[rows, c] → [rows, k]`, token-major, from plain loops.
    fn reference(x: &[f32], w: &[f32], b: &[f32], [t, c, k]: [usize; 3]) -> Vec<f32> {
        let mut y = vec![0f32; t * k];
        for (r, row) in y.chunks_exact_mut(k).enumerate() {
            for (f, v) in row.iter_mut().enumerate() {
                *v = b[f] + (0..c).map(|i| x[r * c + i] * w[f * c + i]).sum::<f32>();
            }
        }
        y
    }

    #[cfg(feature = "multithread")]
    #[test]
    fn threads_split_the_work_without_changing_a_bit() -> TractResult<()> {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        if !gemm::available() {
            return Ok(());
        }
        // Many blocks and one group of panels; one block and many groups.
        for [t, c, k] in [[70, 9, 11], [3, 20, 100]] {
            let axes = LinearAxes { rows: tvec![0], features: 1, out: tvec![OutAxis::Row(0), OutAxis::Features] };
            let (w, b) = (values(k * c, 2), values(k, 3));
            let op = Linear::new(&w, [c, 1], Some(&b), [k, c], axes);
            let x = Tensor::from_shape(&[t, c], &values(t * c, 4))?;
            let one = op.run(&x)?;
            let want = reference(&values(t * c, 4), &w, &b, [t, c, k]);
            for (a, b) in f32s(&one, "one")?.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
            for threads in [2, 3, 5] {
                let many = multithread_tract_scope(Executor::multithread(threads), || op.run(&x))?;
                assert_eq!(f32s(&one, "one")?, f32s(&many, "many")?, "{t}x{c}->{k}: {threads} threads");
            }
        }
        Ok(())
    }
}
