//! 1×1 convolutions on our matrix kernel (`gemm`: x86-64 with AVX2 and FMA, or aarch64); and, the same
//! way, other convolutions computed directly: 3×3 ones of large layers on small maps
//! (`crate::passes::winograd`) and strided ones (diffusers' downsamplers), whose blocks hold one
//! copy of each input channel per kernel tap, shifted (and strided) to line up with the outputs.
//!
//! Why: a 1×1 convolution is one matrix product per image, `y = W · x + b` with `x` as c rows of
//! h·w pixels. tract runs it as a general product that packs its input on every call, splits
//! the ones that read a `Concat` into one product per part plus a sum, and adds the bias in
//! another pass, which made the UNets' skip connections and attention projections a visible
//! part of a call. Here `W` is packed once at load, each block of 16
//! pixels is copied once into a contiguous buffer (rows of a 32×32 map are 4 KB apart, which
//! would make every row of a block fall into the same L1 set) and multiplied by every panel of
//! output channels, and the bias starts the sums.
//!
//! `crate::passes::conv1x1` swaps such tract `Conv` nodes for [`Pointwise`] in the typed graph
//! *before* tract declutters it: declutter turns a 1×1 convolution into an `EinSum` plus a bias
//! `Add` and splits one that reads a `Concat`. The products add in the same order as the plain sum over input
//! channels, one fused multiply-add at a time.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

#[cfg(test)]
use super::packed::Packer;
use super::packed::{Packed, Site};
use super::scratch::{output, recycle, with_scratch, Scratch};
use super::{for_each, threads, Output};
use crate::kernels::direct_conv::{shifted_rows, Phases};
use crate::kernels::gemm::{self, MR, NR};
use crate::kernels::{carve, split, Floats, Window};

/// A 1×1, stride-1 convolution on our kernel, or another one computed directly; see the module
/// docs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pointwise {
    k: usize,
    c: usize,
    window: Window,
    /// The `[k, c·size²]` weights packed for the kernel (`gemm::pack_weights`), float32.
    weights: Packed,
    /// One bias per output channel, float32 `[k]`; `None`: the node's second input, `k` values.
    #[serde(with = "super::serial::tensor::option")]
    bias: Option<Arc<Tensor>>,
    /// Products and sums in float16 (`gemm::block_cols_f16`, the weights rounded to float16),
    /// where the packer asks for them and the CPU has FP16 arithmetic.
    half_products: bool,
}

impl Pointwise {
    #[cfg(test)]
    pub(crate) fn new(weights: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        Self::direct(
            Site { packer: &Packer::default(), node: "", origin: None },
            weights,
            bias,
            [k, c],
            Window::square(1, 0),
        )
    }

    /// A convolution with OIHW `[k, c, size, size]` weights over `window`, computed directly:
    /// the product of the weights, as k × c·size², by c·size² shifted copies of the input. The
    /// packed weights come from the packer, for the node `site` names.
    pub(crate) fn direct(
        site: Site,
        weights: &[f32],
        bias: Option<&[f32]>,
        [k, c]: [usize; 2],
        window: Window,
    ) -> Self {
        let kind = format!("direct{}x{}", window.size, window.size);
        let packed = site.get(&kind, weights, || gemm::pack_weights(weights, k, c * window.size * window.size));
        let half_products = site.half_products();
        let packed = if half_products { packed.into_half() } else { packed };
        Pointwise { k, c, window, weights: packed, bias: bias.map(|b| Arc::new(tensor1(b))), half_products }
    }

    /// `x`: `[n, c, h, w]`, `y`: `[n, k, oh, ow]` (the window's output map), both C order;
    /// `bias`: `k` values; `scratch`: room for the pixel blocks, one per thread.
    fn run(&self, x: &[f32], bias: &[f32], [n, h, w]: [usize; 3], y: &mut [f32], scratch: &mut Scratch) {
        let [oh, ow] = self.window.output([h, w]).expect("checked by eval");
        let (k, t) = (self.k, oh * ow);
        // Rows of a block: one per input channel and kernel tap.
        let c = self.c * self.window.size * self.window.size;
        let u = self.weights.floats();
        let (blocks, panels) = (t.div_ceil(NR), k.div_ceil(MR));
        // Work items: (image, block of pixels, group of panels); with fewer blocks than
        // threads, the threads also split the output channels.
        let parts = threads();
        let groups = parts.div_ceil(n * blocks).min(panels);
        let ranges = split(n * blocks * groups, parts);
        let need = c * NR;
        // A strided window first pads and splits the input by phase (all images, in shares of
        // planes between the threads), then gathers its blocks from there.
        let plain = self.window == Window::square(1, 0);
        let shifted = self.window == Window::square(3, 1);
        let phases = Phases::new(self.window, [h, w]);
        let planes = if plain || shifted { 0 } else { n * self.c };
        let (padded, buffers) =
            scratch.floats(planes * phases.plane() + ranges.len() * need).split_at_mut(planes * phases.plane());
        if planes > 0 {
            let shares = split(planes, parts);
            let pieces = carve(padded, shares.iter().map(|r| r.len() * phases.plane()));
            for_each(shares.into_iter().zip(pieces).collect(), |(share, piece)| {
                for (ci, dst) in share.zip(piece.chunks_exact_mut(phases.plane())) {
                    phases.fill(&x[ci * h * w..][..h * w], [h, w], dst);
                }
            });
        }
        let padded = &*padded;
        let out = Output(y.as_mut_ptr(), y.len());
        let kernel = gemm::Kernel::detect();
        let work: Vec<_> = ranges.into_iter().zip(buffers.chunks_mut(need)).collect();
        for_each(work, |(items, buf)| {
            // Float16 weights: the panels of the last group, widened.
            let (mut wide, mut widened) = (Vec::new(), None);
            // Float16 products: the block rounded to float16.
            #[cfg(target_arch = "aarch64")]
            let mut halves = vec![half::f16::ZERO; if self.half_products { need } else { 0 }];
            for item in items {
                let (image, q, g) = (item / (blocks * groups), item / groups % blocks, item % groups);
                let (t0, width) = (q * NR, NR.min(t - q * NR));
                let xs = &x[image * self.c * h * w..][..self.c * h * w];
                if plain {
                    for (row, src) in buf.chunks_exact_mut(NR).zip(xs.chunks_exact(t)) {
                        row[..width].copy_from_slice(&src[t0..t0 + width]);
                        row[width..].fill(0.0);
                    }
                } else if shifted {
                    shifted_rows(xs, [h, w], t0..t0 + width, buf);
                } else {
                    let image_planes = &padded[image * self.c * phases.plane()..][..self.c * phases.plane()];
                    phases.gather(image_planes, ow, t0..t0 + width, buf);
                }
                let (lo, hi) = (g * panels / groups, (g + 1) * panels / groups);
                let first = (image * k + lo * MR) * t + t0;
                let rows = (hi * MR).min(k) - lo * MR;
                assert!(first + (rows - 1) * t + width <= out.len(), "Pointwise: short output");
                let span = lo * c * MR..hi * c * MR;
                #[cfg(target_arch = "aarch64")]
                if let (true, Floats::F16(u)) = (self.half_products, u) {
                    // Safety: `half_products` only where the CPU has FP16 arithmetic; then as
                    // below, with `halves` the block's c rows of NR.
                    unsafe {
                        crate::kernels::aarch64::gemm_f16::narrow(buf, &mut halves);
                        gemm::block_cols_f16(
                            &u[span],
                            [k - lo * MR, c],
                            0..hi - lo,
                            &halves,
                            NR,
                            width,
                            out.at(first),
                            t,
                            Some(&bias[lo * MR..]),
                        )
                    };
                    continue;
                }
                if widened != Some(g) {
                    u.widen(span.clone(), &mut wide);
                    widened = Some(g);
                }
                let up = match u {
                    Floats::F32(u) => &u[span],
                    Floats::F16(_) => &wide[..],
                };
                // Safety: `available()` (checked by `rewrite`) and the detected kernel; `up`
                // holds the panels from lo (the rows below k − lo·MR), `buf` c rows of NR, the
                // bias from lo, and `rows` rows of `width` inside `y` from `first` (asserted);
                // only this item writes them.
                unsafe {
                    gemm::block_cols(
                        kernel,
                        up,
                        [k - lo * MR, c],
                        0..hi - lo,
                        buf,
                        NR,
                        width,
                        out.at(first),
                        t,
                        Some(&bias[lo * MR..]),
                    )
                };
            }
        });
    }
}

impl Op for Pointwise {
    fn name(&self) -> StaticName {
        "Pointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let Window { size: s, stride, before, after } = self.window;
        Ok(vec![format!("{s}x{s}, stride {stride}, padding {before:?} {after:?}, {} -> {} channels", self.c, self.k)])
    }

    op_as_typed_op!();
}

impl EvalOp for Pointwise {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.weights.prefetch_next();
        let (xs, bias, [n, _, h, w]) = super::conv::call_inputs("Pointwise", &self.bias, &inputs, [self.c, self.k])?;
        ensure!(gemm::available(), "Pointwise: this CPU lacks AVX2 and FMA");
        let Some([oh, ow]) = self.window.output([h, w]) else {
            bail!("Pointwise: a {:?} window does not fit a {h}x{w} map", self.window)
        };
        let mut y = output(ctx, &[n, self.k, oh, ow])?;
        if n * h * w == 0 {
            return Ok(tvec!(y.into_tvalue()));
        }
        let mut out = y.try_as_plain_ram_mut()?;
        let out = out.as_slice_mut::<f32>()?;
        with_scratch(ctx, |scratch| self.run(xs, bias, [n, h, w], out, scratch))?;
        if let Some(x) = inputs.into_iter().next() {
            recycle(ctx, x);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Pointwise {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        super::conv::output_facts(inputs, [self.c, self.k], self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{direct_window, random, values};

    #[cfg(feature = "multithread")]
    #[test]
    fn threads_split_the_work_without_changing_a_bit() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        if !gemm::available() {
            return;
        }
        // 1×1: 2 images of 30 pixels, 4 blocks, fewer than 5 threads, which then split the
        // panels. 3×3: one 4×4 block, the threads split the output channels.
        let (c, bias1, bias3) = (9, values(20, 6), values(31, 35));
        let cases = [
            (Pointwise::new(&values(20 * c, 7), Some(&bias1), 20, c), &bias1, [2, 30, 1]),
            (
                Pointwise::direct(
                    Site { packer: &Packer::default(), node: "", origin: None },
                    &values(31 * c * 9, 36),
                    Some(&bias3),
                    [31, c],
                    Window::square(3, 1),
                ),
                &bias3,
                [1, 4, 4],
            ),
        ];
        for (op, bias, [n, h, w]) in cases {
            let (k, s) = (op.k, op.window.size);
            let x = values(n * c * h * w, 5);
            let mut one = vec![0f32; n * k * h * w];
            op.run(&x, bias, [n, h, w], &mut one, &mut Default::default());
            for threads in [2, 3, 5] {
                let mut many = vec![f32::NAN; n * k * h * w];
                multithread_tract_scope(Executor::multithread(threads), || {
                    op.run(&x, bias, [n, h, w], &mut many, &mut Default::default())
                });
                assert_eq!(one, many, "{s}x{s}: {threads} threads");
            }
        }
    }

    /// Float16 products against the float64 convolution for the 1×1, strided and direct
    /// windows (k off the 12-row blocks, pixels off the 16-pixel blocks), the threads splitting
    /// blocks and output channels without changing a bit.
    #[cfg(all(target_arch = "aarch64", feature = "multithread"))]
    #[test]
    fn half_products_stay_near_the_float64_convolution() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        if !crate::kernels::half_products() {
            eprintln!("no FP16 arithmetic here: nothing to run");
            return;
        }
        let strided = Window { size: 3, stride: 2, before: [1, 1], after: [1, 1] };
        for (window, n, c, k, h, w) in [
            (Window::square(1, 0), 2, 9, 20, 5, 7),
            (Window::square(1, 0), 1, 130, 25, 4, 9),
            (Window::square(3, 1), 1, 31, 13, 4, 4),
            (strided, 2, 6, 19, 9, 10),
        ] {
            let s = window.size;
            let (weights, bias, x) = (random(k * c * s * s, 1), random(k, 2), random(n * c * h * w, 3));
            let want = direct_window(&x, &weights, &bias, [n, c, h, w], k, window);
            let packer = Packer::default();
            packer.set_half_products(true);
            let op = Pointwise::direct(
                Site { packer: &packer, node: "", origin: None },
                &weights,
                Some(&bias),
                [k, c],
                window,
            );
            assert!(op.half_products && op.weights.is_half());
            let mut y = vec![f32::NAN; want.len()];
            op.run(&x, &bias, [n, h, w], &mut y, &mut Default::default());
            let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            // Operands and sums in float16: about 2^-11 of sums of up to c·s² terms of size ≤ 1.
            assert!(worst < 4e-3 * ((c * s * s) as f64).sqrt(), "{window:?} c{c} k{k}: max abs error {worst}");
            for threads in [2, 3] {
                let mut many = vec![f32::NAN; want.len()];
                multithread_tract_scope(Executor::multithread(threads), || {
                    op.run(&x, &bias, [n, h, w], &mut many, &mut Default::default())
                });
                assert!(y.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits()), "{window:?}: {threads} threads");
            }
        }
    }

    /// The operator with its bias as a second input (tract folds a computed per-channel add
    /// into a convolution's bias) gives the same bits as with the bias as a constant.
    #[test]
    fn a_bias_input_gives_the_constant_bias_result() -> TractResult<()> {
        if !gemm::available() {
            return Ok(());
        }
        let (n, c, k, h, w) = (2, 10, 14, 5, 7);
        let (weights, bias) = (values(k * c, 8), values(k, 9));
        let x = Tensor::from_shape(&[n, c, h, w], &values(n * c * h * w, 10))?;
        let mut model = TypedModel::default();
        let xs = model.add_source("x", f32::fact([n, c, h, w]))?;
        let b = model.add_source("b", f32::fact([1, k, 1, 1]))?;
        let with_input = model.wire_node("input", Pointwise::new(&weights, None, k, c), &[xs, b])?[0];
        let with_const = model.wire_node("const", Pointwise::new(&weights, Some(&bias), k, c), &[xs])?[0];
        model.select_output_outlets(&[with_input, with_const])?;
        let b = Tensor::from_shape(&[1, k, 1, 1], &bias)?;
        let out = model.into_runnable()?.run(tvec![x.into_tvalue(), b.into_tvalue()])?;
        assert_eq!(crate::ops::f32s(&out[0], "input")?, crate::ops::f32s(&out[1], "const")?);
        // A wrong number of biases is an error, not a panic.
        let mut model = TypedModel::default();
        let xs = model.add_source("x", f32::fact([1, c, 2, 2]))?;
        let b = model.add_source("b", f32::fact([k + 1]))?;
        let y = model.wire_node("input", Pointwise::new(&weights, None, k, c), &[xs, b])?;
        model.select_output_outlets(&y)?;
        let inputs =
            tvec![Tensor::zero::<f32>(&[1, c, 2, 2])?.into_tvalue(), Tensor::zero::<f32>(&[k + 1])?.into_tvalue()];
        assert!(model.into_runnable()?.run(inputs).is_err());
        Ok(())
    }

    /// Direct convolutions against a float64 one. 3×3 padding-1 windows (gathered by
    /// `shifted_rows`): maps of one pixel, of fewer pixels than a block, of several blocks
    /// (blocks that start mid-row), batches of 1–3. Windows gathered from phases: diffusers'
    /// downsamplers (3×3, stride 2, padding 1 on every side, or only after the map), odd map
    /// sizes, a 1×1 stride-2 window, stride 3, uneven stride-1 padding; output maps of one
    /// pixel, fewer pixels than a block, and several blocks starting mid-row.
    #[test]
    fn direct_windows_match_a_direct_convolution() {
        if !gemm::available() {
            eprintln!("no AVX2 and FMA here: the kernel cannot run");
            return;
        }
        let shifted = Window::square(3, 1);
        let down = |before, after| Window { size: 3, stride: 2, before: [before; 2], after: [after; 2] };
        let cases = [
            (1, 3, 5, [4, 4], shifted),
            (2, 7, 13, [3, 5], shifted),
            (3, 2, 1, [1, 1], shifted),
            (1, 5, 8, [5, 7], shifted),
            (2, 4, 7, [2, 9], shifted),
            (1, 3, 5, [8, 8], down(1, 1)),
            (2, 7, 13, [11, 9], down(1, 1)),
            (1, 4, 6, [12, 10], down(0, 1)),
            (3, 2, 1, [2, 2], down(0, 1)),
            (2, 5, 8, [1, 1], down(1, 1)),
            (1, 6, 7, [16, 18], Window { size: 3, stride: 3, before: [1, 0], after: [0, 2] }),
            (2, 9, 4, [7, 10], Window { size: 1, stride: 2, before: [0; 2], after: [0; 2] }),
            (1, 3, 5, [6, 19], Window { size: 3, stride: 1, before: [0, 2], after: [1, 0] }),
        ];
        for (n, c, k, [h, w], g) in cases {
            let [oh, ow] = g.output([h, w]).expect("the window fits");
            let s = g.size;
            let (x, kernel, bias) = (random(n * c * h * w, 41), random(k * c * s * s, 42), random(k, 43));
            let want = direct_window(&x, &kernel, &bias, [n, c, h, w], k, g);
            let op = Pointwise::direct(
                Site { packer: &Packer::default(), node: "", origin: None },
                &kernel,
                Some(&bias),
                [k, c],
                g,
            );
            let mut y = vec![f32::NAN; n * k * oh * ow];
            op.run(&x, &bias, [n, h, w], &mut y, &mut Default::default());
            let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-5, "n{n} c{c} k{k} {h}x{w} {g:?}: max abs error {worst}");
        }
    }
}
