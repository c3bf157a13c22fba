//! Linear layers (a product by constant weights, plus a constant bias) on our linear-layer
//! kernel (`crate::kernels::x86_64::linear`), on x86-64 with AVX2 and FMA.
//!
//! Why: a transformer's call is mostly its linear layers: `[tokens, c] × [c, k]` with constant
//! weights (the attention projections, the MLPs, the adaLN modulations). tract runs them on its
//! general product, which packs the activations on every call and keeps one multiply-add per
//! load, and adds the bias in another node. Here the weights are packed once at load into panels
//! of output features, each block of rows is packed once per call, and the bias starts the sums.
//! The rows go in chunks of [`CHUNK`] blocks; a chunk's packed rows stay in L2 while every panel
//! of weights runs over them, a [`SLICE`] of input features at a time, so that the slice of the
//! panel stays in L1 while every block of the chunk uses it (the sums go on from one slice to the
//! next in order). The block height is chosen per call for the least padding.
//!
//! On aarch64 the operator runs only in float16 plans on CPUs with FP16 arithmetic (our float32
//! NEON kernel does fewer multiply-adds per instruction than tract's there): the product is the
//! convolutions' float16 one (`crate::kernels::gemm::product_f16`) turned around, with the rows
//! of `X`, packed and rounded to float16 per call, as its panels and `W` (c × k, float16 from
//! load) as its columns, so that it writes `Y` row by row; the bias is added in float32.
//!
//! `crate::passes::linear` finds the `EinSum`s and the bias `Add`s. Float32 on x86-64; the sums
//! add the input features in order, one fused multiply-add at a time.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

#[cfg(test)]
use super::packed::Packer;
use super::packed::{Packed, Site};
use super::scratch::{with_scratch, Scratch};
use super::{f32s, for_each, strided_offset, threads, Output};
use crate::kernels::gemm::Kernel;
#[cfg(target_arch = "x86_64")]
use crate::kernels::x86_64::linear::{block, pack_rows, pack_weights, Start, MOST_ROWS, MOST_WIDTH};
#[cfg(target_arch = "x86_64")]
use crate::kernels::Floats;
use crate::kernels::{carve, split};

/// Blocks of rows per chunk: a chunk's packed rows (at most 16 · 14 rows of c features) stay in
/// L2 while the panels run over them.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 16;

/// Input features per slice: a slice of a panel (`SLICE` · 32 floats, 24 KiB) and of a block's
/// rows (`SLICE` · 14 floats at most) fit in L1 together.
#[cfg(target_arch = "x86_64")]
const SLICE: usize = 192;

/// Where the rows, the input features and the output features are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct LinearAxes {
    /// The input's axes that the output keeps, in the input's order: the rows. Its other axes
    /// than these and `features` have one element.
    #[serde(with = "super::serial::tvec")]
    pub rows: TVec<usize>,
    /// The input's feature axes (c, flattened in this order; most layers have one).
    #[serde(with = "super::serial::tvec")]
    pub features: TVec<usize>,
    /// What each axis of the output is.
    #[serde(with = "super::serial::tvec")]
    pub out: TVec<OutAxis>,
}

/// An axis of a [`Linear`] output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) enum OutAxis {
    /// `rows[i]` of the input.
    Row(usize),
    /// The output features (k).
    Features,
    /// An axis of one element that the input does not have.
    One,
}

/// `y = x · W + b` over the feature axis; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Linear {
    pub(crate) k: usize,
    pub(crate) c: usize,
    pub(crate) axes: LinearAxes,
    /// The kernel the weights are packed for.
    pub(crate) kernel: Kernel,
    /// `W` packed for `kernel` (on aarch64: c rows of k, float16).
    pub(crate) weights: Packed,
    /// `k` values, zero-padded to whole panels; zeros when the layer has none.
    #[serde(with = "super::serial::tensor")]
    pub(crate) bias: Arc<Tensor>,
}

/// Where a call's rows, features and outputs lie (see [`Linear::layout`]).
struct Layout {
    /// The output's shape.
    shape: TVec<usize>,
    /// The row axes' lengths, and their strides in the input and the output.
    dims: TVec<usize>,
    x_strides: TVec<usize>,
    y_strides: TVec<usize>,
    /// Where each input feature lies from its row's start; the output features' stride.
    features: Vec<usize>,
    y_feature: usize,
    /// Rows in all.
    t: usize,
    /// Row r at r · k, its features in a row.
    token_major: bool,
}

impl Linear {
    /// `weights` holds W with element (output feature f, input feature i) at
    /// `f · strides[0] + i · strides[1]`.
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn new(
        weights: &[f32],
        strides: [usize; 2],
        bias: Option<&[f32]>,
        [k, c]: [usize; 2],
        axes: LinearAxes,
    ) -> Self {
        let site = Site { packer: &Packer::default(), node: "", origin: None };
        Self::new_in(site, weights, || weights.to_vec(), strides, bias, [k, c], axes)
    }

    /// [`Self::new`] with the packed weights from the packer, for the node `site` names:
    /// `source` is the constant they come from, `weights()` gives them as `new` takes them,
    /// called only when the packer has to pack (a load from a plan file never does, so the
    /// weights are not copied).
    pub(crate) fn new_in(
        site: Site,
        source: &[f32],
        weights: impl FnOnce() -> Vec<f32>,
        strides: [usize; 2],
        bias: Option<&[f32]>,
        [k, c]: [usize; 2],
        axes: LinearAxes,
    ) -> Self {
        let kernel = Kernel::detect();
        #[cfg(target_arch = "x86_64")]
        let (packed, mut padded) = {
            let packed = site.get("linear", source, || pack_weights(kernel, &weights(), [k, c], strides));
            (packed, vec![0f32; k.div_ceil(kernel.width()) * kernel.width()])
        };
        #[cfg(target_arch = "aarch64")]
        let (packed, mut padded) = {
            // W as the float16 product's columns: c rows of k.
            let columns = || {
                let w = weights();
                (0..c * k).map(|at| w[(at % k) * strides[0] + (at / k) * strides[1]]).collect()
            };
            (site.get("linear", source, columns).into_half(), vec![0f32; k])
        };
        if let Some(bias) = bias {
            padded[..k].copy_from_slice(bias);
        }
        Linear { k, c, axes, kernel, weights: packed, bias: Arc::new(tensor1(&padded)) }
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

    /// Where `x`'s rows and features lie, and the output's.
    fn layout(&self, x: &Tensor) -> TractResult<Layout> {
        let c_dims: TVec<usize> = self.axes.features.iter().map(|&a| x.shape()[a]).collect();
        ensure!(c_dims.iter().product::<usize>() == self.c, "Linear: {c_dims:?} input features, not {}", self.c);
        let shape = self.output_shape(x.shape(), self.k, 1);
        let natural = Tensor::natural_strides(x.shape());
        let dims: TVec<usize> = self.axes.rows.iter().map(|&a| x.shape()[a]).collect();
        let x_strides: TVec<usize> = self.axes.rows.iter().map(|&a| natural[a] as usize).collect();
        // Where each input feature lies from its row's start.
        let c_strides: TVec<usize> = self.axes.features.iter().map(|&a| natural[a] as usize).collect();
        let features: Vec<usize> = (0..self.c).map(|i| strided_offset(i, &c_dims, &c_strides)).collect();
        let natural_y = Tensor::natural_strides(&shape);
        let (mut y_strides, mut y_feature) = (tvec![0usize; dims.len()], 0);
        for (axis, role) in self.axes.out.iter().enumerate() {
            match role {
                OutAxis::Row(i) => y_strides[*i] = natural_y[axis] as usize,
                OutAxis::Features => y_feature = natural_y[axis] as usize,
                OutAxis::One => (),
            }
        }
        let k = self.k;
        let t: usize = dims.iter().product();
        let token_major =
            y_feature == 1 && (0..dims.len()).all(|i| y_strides[i] == k * dims[i + 1..].iter().product::<usize>());
        Ok(Layout { shape, dims, x_strides, y_strides, features, y_feature, t, token_major })
    }

    #[cfg(target_arch = "x86_64")]
    fn run(&self, x: &Tensor, scratch: &mut Scratch) -> TractResult<Tensor> {
        ensure!(self.kernel.runs_here(), "Linear: this CPU lacks the kernel's instructions");
        let Layout { shape, dims, x_strides, y_strides, features, y_feature, t, token_major } = self.layout(x)?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let xs = f32s(x, "Linear")?;
        let (k, c, kernel) = (self.k, self.c, self.kernel);
        if t * k == 0 {
            return Ok(y);
        }
        // A token-major output takes a block's rows whole.
        let (height, width) = (kernel.height_for(t), kernel.width());
        let (blocks, panels) = (t.div_ceil(height), k.div_ceil(width));
        let u = self.weights.floats();
        let bias = f32s(&self.bias, "Linear")?;
        let parts = threads();
        let mut plain = y.try_as_plain_ram_mut()?;
        let ys = plain.as_slice_mut::<f32>()?;
        let out = Output(ys.as_mut_ptr(), ys.len());
        {
            // Every block of rows packed once, as c groups of `height` (zero past the last row).
            let packed = scratch.floats(blocks * c * height);
            let shares = split(blocks, parts);
            let pieces = carve(packed, shares.iter().map(|r| r.len() * c * height));
            for_each(shares.into_iter().zip(pieces).collect(), |(share, piece)| {
                for (b, rows) in share.zip(piece.chunks_exact_mut(c * height)) {
                    let r0 = b * height;
                    let offset = |r| strided_offset(r, &dims, &x_strides);
                    pack_rows(height, xs, r0..(r0 + height).min(t), offset, &features, rows);
                }
            });
            // Work items: (chunk of blocks, share of the panels), a whole number of them per
            // thread: 3 chunks on 2 threads would leave one thread idle for a third of the call.
            // Panels are shared out rather than chunks made smaller, so that each weight still
            // comes from memory once per chunk; blocks are, when there are too few panels.
            let chunks = match panels >= parts {
                true => split(blocks, blocks.div_ceil(CHUNK)),
                false => split(blocks, blocks.div_ceil(CHUNK).max(parts).next_multiple_of(parts)),
            };
            let splits = (parts / gcd(chunks.len(), parts)).min(panels);
            let items: Vec<_> = chunks
                .iter()
                .flat_map(|chunk| split(panels, splits).into_iter().map(move |share| (chunk.clone(), share)))
                .collect();
            let packed = &*packed;
            for_each(items, |(chunk, share)| {
                // The chunk's partial sums, block by block: `height` rows of `width` each.
                let mut sums = [0f32; CHUNK * MOST_ROWS * MOST_WIDTH];
                let mut wide = Vec::new();
                let end = share.end * c * width;
                for p in share {
                    let panel = u.widen(p * c * width..(p + 1) * c * width, &mut wide);
                    let bias = &bias[p * width..][..width];
                    let features = width.min(k - p * width);
                    // A whole block of a token-major output, with all `width` features of the
                    // panel in range, gets its sums straight from the kernel: no tile to copy.
                    let direct = |b: usize| token_major && features == width && (b + 1) * height <= t;
                    // A slice of the input features at a time: its part of the panel stays in
                    // L1 while every block of the chunk runs over it.
                    for i0 in (0..c).step_by(SLICE) {
                        let n = SLICE.min(c - i0);
                        let part = &panel[i0 * width..][..n * width];
                        // The next slice of this item's weights (panels lie one after another),
                        // requested a share per block of the chunk: weights come from memory
                        // once per chunk, and asking for a whole slice during one block stalled
                        // that block on the memory while the chunk's other blocks asked nothing.
                        let ahead = match u {
                            Floats::F32(all) => {
                                let from = (p * c + i0 + n) * width;
                                &all[from.min(end)..(from + SLICE * width).min(end)]
                            }
                            Floats::F16(_) => &[],
                        };
                        let share = (ahead.len() / width).div_ceil(chunk.len()) * width;
                        for (j, b) in chunk.clone().enumerate() {
                            let rows = &packed[(b * c + i0) * height..][..n * height];
                            let tile = &mut sums[j * height * width..][..height * width];
                            let ahead = &ahead[(j * share).min(ahead.len())..((j + 1) * share).min(ahead.len())];
                            let (tile, first) = (tile.as_mut_ptr(), i0 == 0);
                            if i0 + n == c && direct(b) {
                                // The last slice stores the sums in the output's rows.
                                let at = b * height * k + p * width;
                                assert!(at + (height - 1) * k + width <= out.len(), "Linear: short output");
                                let start = if first { Start::Bias(bias) } else { Start::Rows(tile, width) };
                                // Safety: as below, with `height` rows of `width` inside `y`
                                // (asserted) that only this item writes.
                                unsafe { block(kernel, height, rows, part, start, ahead, out.at(at), k) };
                                continue;
                            }
                            let start = if first { Start::Bias(bias) } else { Start::Out };
                            // Safety: `runs_here` above, `height` is the kernel's; n groups of
                            // rows and of the panel, a bias of `width`, a tile of `height` rows
                            // of `width`.
                            unsafe { block(kernel, height, rows, part, start, ahead, tile, width) };
                        }
                    }
                    for (j, b) in chunk.clone().enumerate().filter(|&(_, b)| !direct(b)) {
                        let tile = &sums[j * height * width..][..height * width];
                        let r0 = b * height;
                        let count = height.min(t - r0);
                        if token_major {
                            for (r, row) in tile.chunks_exact(width).take(count).enumerate() {
                                let at = (r0 + r) * k + p * width;
                                assert!(at + features <= out.len(), "Linear: short output");
                                // Safety: inside `y` (asserted); only this item writes it.
                                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.at(at), features) };
                            }
                            continue;
                        }
                        // Feature by feature: in a channels-first output a feature's rows are
                        // often neighbours.
                        let mut at = [0usize; MOST_ROWS];
                        for (j, a) in at[..count].iter_mut().enumerate() {
                            *a = strided_offset(r0 + j, &dims, &y_strides) + p * width * y_feature;
                        }
                        for f in 0..features {
                            for (j, &a) in at[..count].iter().enumerate() {
                                let i = a + f * y_feature;
                                assert!(i < out.len(), "Linear: short output");
                                // Safety: inside `y` (asserted); only this item writes it.
                                unsafe { *out.at(i) = tile[j * width + f] };
                            }
                        }
                    }
                }
            });
        }
        Ok(y)
    }
}

#[cfg(target_arch = "aarch64")]
impl Linear {
    /// `Y = X · W + b` on the float16 product (see the module docs).
    fn run(&self, x: &Tensor, scratch: &mut Scratch) -> TractResult<Tensor> {
        use crate::kernels::gemm::{block_cols_f16, columns, packed_len, MR, NR};
        ensure!(crate::kernels::half_products(), "Linear: this CPU has no FP16 arithmetic");
        let crate::kernels::Floats::F16(w) = self.weights.floats() else { bail!("Linear: float32 weights") };
        let Layout { shape, dims, x_strides, y_strides, features, y_feature, t, token_major } = self.layout(x)?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let xs = f32s(x, "Linear")?;
        let (k, c) = (self.k, self.c);
        if t * k == 0 {
            return Ok(y);
        }
        let bias = f32s(&self.bias, "Linear")?;
        let parts = threads();
        let len = packed_len(t, c);
        // X in panels of MR rows, each c columns of MR (zero past the last row), then in float16.
        let Scratch { v, m, h, .. } = scratch;
        if v.len() < len {
            v.resize(len, 0.0);
        }
        if h.len() < len {
            h.resize(len, half::f16::ZERO);
        }
        let panels = t.div_ceil(MR);
        let shares = split(panels, parts);
        let pieces = carve(&mut v[..len], shares.iter().map(|r| r.len() * c * MR));
        let halves: Vec<&mut [half::f16]> = shares
            .iter()
            .scan(&mut h[..len], |rest, r| {
                let (piece, tail) = std::mem::take(rest).split_at_mut(r.len() * c * MR);
                *rest = tail;
                Some(piece)
            })
            .collect();
        // Most layers read each row's features side by side: a panel of whole rows is then MR
        // slices read in step, without a lookup per feature.
        let side_by_side = features.iter().enumerate().all(|(i, &f)| f == i);
        let work: Vec<_> = shares.into_iter().zip(pieces).zip(halves).collect();
        for_each(work, |((share, piece), half)| {
            for (p, panel) in share.zip(piece.chunks_exact_mut(c * MR)) {
                let at: [Option<usize>; MR] = std::array::from_fn(|r| {
                    let row = p * MR + r;
                    (row < t).then(|| strided_offset(row, &dims, &x_strides))
                });
                if side_by_side && at.iter().all(Option::is_some) {
                    let rows: [&[f32]; MR] = at.map(|a| a.map_or(&[][..], |a| &xs[a..a + c]));
                    for (i, dst) in panel.chunks_exact_mut(MR).enumerate() {
                        for (d, row) in dst.iter_mut().zip(&rows) {
                            *d = row[i];
                        }
                    }
                    continue;
                }
                for (r, at) in at.into_iter().enumerate() {
                    for (i, &f) in features.iter().enumerate() {
                        panel[i * MR + r] = at.map_or(0.0, |a| xs[a + f]);
                    }
                }
            }
            // Safety: `half_products` checked above: the CPU has FP16 arithmetic.
            unsafe { crate::kernels::aarch64::gemm_f16::narrow(piece, half) };
        });
        let u = &h[..len];
        // The products, blocks of NR output features shared out; into `y` itself when it is
        // token-major, else into `m` (t × k) and then to their places.
        let mut plain = y.try_as_plain_ram_mut()?;
        let ys = plain.as_slice_mut::<f32>()?;
        if !token_major && m.len() < t * k {
            m.resize(t * k, 0.0);
        }
        let dst = if token_major { &mut ys[..t * k] } else { &mut m[..t * k] };
        let out = Output(dst.as_mut_ptr(), dst.len());
        for_each(split(k.div_ceil(NR), parts), |blocks| {
            let mut tail = Vec::new();
            for b in blocks {
                let f0 = b * NR;
                let width = NR.min(k - f0);
                let (rows, stride) = columns(w, [c, k], f0, &mut tail);
                assert!(f0 + width + (t - 1) * k <= out.len(), "Linear: short output");
                // Safety: FP16 arithmetic (above); `u` holds every panel of the t rows, `rows`
                // c rows of NR halves `stride` apart; `width` columns from f0 of the t rows of
                // the output, k apart (asserted); only this item writes those columns.
                unsafe { block_cols_f16(u, [t, c], 0..panels, rows, stride, width, out.at(f0), k, None) };
                for r in 0..t {
                    // Safety: inside the output (asserted above); only this item writes it.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.at(r * k + f0), width) };
                    row.iter_mut().zip(&bias[f0..f0 + width]).for_each(|(y, b)| *y += b);
                }
            }
        });
        if !token_major {
            for (r, row) in m[..t * k].chunks_exact(k).enumerate() {
                let at = strided_offset(r, &dims, &y_strides);
                for (f, &v) in row.iter().enumerate() {
                    ys[at + f * y_feature] = v;
                }
            }
        }
        Ok(y)
    }
}

/// The greatest common divisor of `a` and `b`.
#[cfg(target_arch = "x86_64")]
fn gcd(a: usize, b: usize) -> usize {
    match b {
        0 => a,
        _ => gcd(b, a % b),
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

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.weights.prefetch_next();
        let x = args_1!(inputs);
        Ok(tvec!(with_scratch(ctx, |scratch| self.run(&x, scratch))??.into_tvalue()))
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
    #[cfg(target_arch = "x86_64")]
    fn reference(x: &[f32], w: &[f32], b: &[f32], [t, c, k]: [usize; 3]) -> Vec<f32> {
        let mut y = vec![0f32; t * k];
        for (r, row) in y.chunks_exact_mut(k).enumerate() {
            for (f, v) in row.iter_mut().enumerate() {
                *v = b[f] + (0..c).map(|i| x[r * c + i] * w[f * c + i]).sum::<f32>();
            }
        }
        y
    }

    #[cfg(all(feature = "multithread", target_arch = "x86_64"))]
    #[test]
    fn threads_split_the_work_without_changing_a_bit() -> TractResult<()> {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        if !crate::kernels::gemm::available() {
            return Ok(());
        }
        // Many blocks and one group of panels; one block and many groups; sums over two
        // slices of features; whole blocks and panels whose sums go straight to the output
        // beside a last block and a last panel that go through the tile.
        for [t, c, k] in [[70, 9, 11], [3, 20, 100], [70, 300, 40], [29, 50, 70]] {
            let axes =
                LinearAxes { rows: tvec![0], features: tvec![1], out: tvec![OutAxis::Row(0), OutAxis::Features] };
            let (w, b) = (values(k * c, 2), values(k, 3));
            let op = Linear::new(&w, [c, 1], Some(&b), [k, c], axes);
            let x = Tensor::from_shape(&[t, c], &values(t * c, 4))?;
            let one = op.run(&x, &mut Scratch::default())?;
            let want = reference(&values(t * c, 4), &w, &b, [t, c, k]);
            for (a, b) in f32s(&one, "one")?.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
            for threads in [2, 3, 5] {
                let many =
                    multithread_tract_scope(Executor::multithread(threads), || op.run(&x, &mut Scratch::default()))?;
                assert_eq!(f32s(&one, "one")?, f32s(&many, "many")?, "{t}x{c}->{k}: {threads} threads");
            }
        }
        Ok(())
    }

    /// The float16 path against float64 sums of the float16-rounded operands (the sums run in
    /// float16: see `crate::kernels::gemm`'s test of the product), token-major and
    /// feature-major outputs, rows off the panels and features off the blocks; and 1 thread
    /// against 3, bit for bit.
    #[cfg(all(feature = "multithread", target_arch = "aarch64"))]
    #[test]
    fn half_products_stay_near_float64_on_any_thread_count() -> TractResult<()> {
        use half::f16;
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        if !crate::kernels::half_products() {
            eprintln!("no FP16 arithmetic here: nothing to run");
            return Ok(());
        }
        let round = |v: f32| f16::from_f32(v).to_f64();
        for [t, c, k] in [[70, 9, 11], [3, 20, 100], [13, 64, 33], [1, 1, 1], [12, 256, 16]] {
            for feature_major in [false, true] {
                let out = match feature_major {
                    false => tvec![OutAxis::Row(0), OutAxis::Features],
                    true => tvec![OutAxis::Features, OutAxis::Row(0)],
                };
                let axes = LinearAxes { rows: tvec![0], features: tvec![1], out };
                let (w, b) = (values(k * c, 2), values(k, 3));
                let packer = Packer::default();
                packer.set_half_products(true);
                let site = Site { packer: &packer, node: "", origin: None };
                let op = Linear::new_in(site, &w, || w.clone(), [c, 1], Some(&b), [k, c], axes);
                let xv = values(t * c, 4);
                let x = Tensor::from_shape(&[t, c], &xv)?;
                let one = op.run(&x, &mut Scratch::default())?;
                let ys = f32s(&one, "one")?;
                for (r, f) in (0..t).flat_map(|r| (0..k).map(move |f| (r, f))) {
                    let terms = (0..c).map(|i| round(xv[r * c + i]) * round(w[f * c + i]));
                    let (sum, size) = terms.fold((0.0, 0.0), |(s, a): (f64, f64), v| (s + v, a + v.abs()));
                    let got = ys[if feature_major { f * t + r } else { r * k + f }] as f64;
                    let want = sum + b[f] as f64;
                    assert!(
                        (got - want).abs() <= 1e-3 * size * (c as f64).sqrt() + 1e-6,
                        "{t}x{c}->{k} feature-major {feature_major} ({r}, {f}): {got} vs {want}"
                    );
                }
                let many = multithread_tract_scope(Executor::multithread(3), || op.run(&x, &mut Scratch::default()))?;
                assert_eq!(ys, f32s(&many, "many")?, "{t}x{c}->{k}: 3 threads");
            }
        }
        Ok(())
    }
}
