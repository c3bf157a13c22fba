//! 1×1 convolutions on our matrix kernel (`gemm`), x86-64 with AVX2 and FMA; and, the same
//! way, other convolutions computed directly: 3×3 ones of large layers on small maps
//! (`winograd::direct_pays`) and strided ones (diffusers' downsamplers), whose blocks hold one
//! copy of each input channel per kernel tap, shifted (and strided) to line up with the outputs.
//!
//! Why: a 1×1 convolution is one matrix product per image, `y = W · x + b` with `x` as c rows of
//! h·w pixels. tract runs it as a general product that packs its input on every call, splits
//! the ones that read a `Concat` into one product per part plus a sum, and adds the bias in
//! another pass; the UNets' skip connections and attention projections took 0.9 ms of a 12 ms
//! student call that way (`profile_ops`). Here `W` is packed once at load, each block of 16
//! pixels is copied once into a contiguous buffer (rows of a 32×32 map are 4 KB apart, which
//! would make every row of a block fall into the same L1 set) and multiplied by every panel of
//! output channels, and the bias starts the sums.
//!
//! [`rewrite`] swaps such tract `Conv` nodes for [`Pointwise`] in the typed graph *before*
//! tract declutters it: declutter turns a 1×1 convolution into an `EinSum` plus a bias `Add`
//! and splits one that reads a `Concat`. The products add in the same order as the plain sum over input
//! channels, one fused multiply-add at a time.

use crate::conv::Window;
use crate::gemm::{self, MR, NR};
use crate::winograd::{f32s, for_each, split, threads, with_scratch};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Replaces every float32, 1×1, stride-1, unpadded, ungrouped NCHW convolution with constant
/// weights by a [`Pointwise`] node, when this CPU runs our kernel. Returns how many were
/// replaced. The bias may be a computed input of `k` values.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    crate::conv::rewrite(model, "Pointwise", |f| {
        let op = || Box::new(Pointwise::new(f.kernel, f.bias.as_deref(), f.k, f.c)) as Box<dyn TypedOp>;
        (f.window == Window::square(1, 0)).then(op)
    })
}

/// Replaces every float32 strided convolution (stride 2 or more) over a batch of 2 or more that
/// [`crate::conv`] can take by a direct [`Pointwise`] one, when this CPU runs our kernel.
/// Returns how many were replaced.
///
/// tract runs such a convolution as a product over a lazily addressed im2col at batch 1, but
/// copies the whole im2col matrix first at batch 2 (a guided step in one call). Here the input
/// is split once by phase of the stride ([`Phases`]) and each block of 16 output pixels copies
/// its 9c rows from there. Measured (`profile_ops`, 1 thread): at batch 2 the teacher's two
/// downsamplers 0.20 against 0.25 ms, the 35.7M UNet's three 2.32–2.38 against 2.87–3.07; at
/// batch 1 no gain (35.7M 1.13–1.14 against 1.12–1.18 ms with tract's `Pad`, teacher
/// 0.096–0.100 against 0.086–0.097), so batch 1 stays with tract.
pub fn rewrite_strided(model: &mut TypedModel) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    crate::conv::rewrite(model, "Pointwise", |f| {
        let op = || Box::new(Pointwise::direct(f.kernel, f.bias.as_deref(), f.k, f.c, f.window)) as Box<dyn TypedOp>;
        (f.window.stride > 1 && f.n > 1).then(op)
    })
}

/// A 1×1, stride-1 convolution on our kernel, or another one computed directly; see the module
/// docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointwise {
    k: usize,
    c: usize,
    window: Window,
    /// The `[k, c·size²]` weights packed for the kernel (`gemm::pack_weights`), float32.
    weights: Arc<Tensor>,
    /// One bias per output channel, float32 `[k]`; `None`: the node's second input, `k` values.
    bias: Option<Arc<Tensor>>,
}

impl Pointwise {
    fn new(weights: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        Self::direct(weights, bias, k, c, Window::square(1, 0))
    }

    /// A convolution with OIHW `[k, c, size, size]` weights over `window`, computed directly:
    /// the product of the weights, as k × c·size², by c·size² shifted copies of the input.
    pub(crate) fn direct(weights: &[f32], bias: Option<&[f32]>, k: usize, c: usize, window: Window) -> Self {
        let packed = gemm::pack_weights(weights, k, c * window.size * window.size);
        Pointwise { k, c, window, weights: Arc::new(tensor1(&packed)), bias: bias.map(|b| Arc::new(tensor1(b))) }
    }

    /// `x`: `[n, c, h, w]`, `y`: `[n, k, oh, ow]` (the window's output map), both C order;
    /// `bias`: `k` values; `scratch`: room for the pixel blocks, one per thread.
    fn run(
        &self,
        x: &[f32],
        bias: &[f32],
        [n, h, w]: [usize; 3],
        y: &mut [f32],
        scratch: &mut crate::winograd::Scratch,
    ) {
        let [oh, ow] = self.window.output([h, w]).expect("checked by eval");
        let (k, t) = (self.k, oh * ow);
        // Rows of a block: one per input channel and kernel tap.
        let c = self.c * self.window.size * self.window.size;
        let u = f32s(&self.weights, "Pointwise").expect("f32 weights");
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
            let pieces = crate::winograd::carve(padded, shares.iter().map(|r| r.len() * phases.plane()));
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
                // Safety: `available()` (checked by `rewrite`) and the detected kernel; the
                // panels of `u`, c rows of NR in `buf`, `bias` of k, and `rows` rows of `width`
                // inside `y` from `first` (asserted); only this item writes them.
                unsafe { gemm::block_cols(kernel, u, [k, c], lo..hi, buf, NR, width, out.at(first), t, Some(bias)) };
            }
        });
    }
}

/// For pixels `pixels` of each `h` × `w` plane of `x`, the 9 rows of NR values that a 3×3
/// kernel multiplies: row `9ci + 3dy + dx` holds plane ci shifted by (dy − 1, dx − 1), zero
/// outside the plane and past the block's pixels.
fn shifted_rows(x: &[f32], [h, w]: [usize; 2], pixels: std::ops::Range<usize>, buf: &mut [f32]) {
    for (plane, rows) in x.chunks_exact(h * w).zip(buf.chunks_exact_mut(9 * NR)) {
        rows.fill(0.0);
        // The block's pixels in stretches along image rows: (first lane, row, first column, length).
        let mut at = pixels.start;
        while at < pixels.end {
            let (py, px0) = (at / w, at % w);
            let len = (w - px0).min(pixels.end - at);
            let lane = at - pixels.start;
            for dy in 0..3 {
                let Some(yy) = (py + dy).checked_sub(1).filter(|&yy| yy < h) else { continue };
                let src = &plane[yy * w..][..w];
                for dx in 0..3 {
                    let row = &mut rows[(3 * dy + dx) * NR + lane..][..len];
                    for (j, v) in row.iter_mut().enumerate() {
                        if let Some(xx) = (px0 + j + dx).checked_sub(1).filter(|&xx| xx < w) {
                            *v = src[xx];
                        }
                    }
                }
            }
            at += len;
        }
    }
}

/// The input of a convolution zero-padded and split by phase of the stride, so that each kernel
/// tap reads a stretch of output pixels as one contiguous run. Phase (py, px) of an input
/// plane holds padded pixel (i·s + py, j·s + px) at (i, j); output pixel (oy, ox) then reads
/// tap (dy, dx) from phase (dy % s, dx % s) at (oy + dy / s, ox + dx / s).
///
/// Gathering with strided reads and bounds checks per value took longer than the products for
/// the teacher's 32-channel downsampler (71 µs a call against tract's 64). On 4×4 maps, whose
/// stretches are 4 pixels long, copying from phases was slower than [`shifted_rows`] (the
/// 35.7M UNet's 256-channel layers 0.14 → 0.165 ms), so stride-1 3×3 windows gather directly.
#[derive(Debug, Clone, Copy)]
struct Phases {
    window: Window,
    /// Rows and columns of each phase.
    rows: usize,
    cols: usize,
}

impl Phases {
    fn new(g: Window, [h, w]: [usize; 2]) -> Self {
        let s = g.stride;
        let (rows, cols) = ((h + g.before[0] + g.after[0]).div_ceil(s), (w + g.before[1] + g.after[1]).div_ceil(s));
        Phases { window: g, rows, cols }
    }

    /// Floats per input plane.
    fn plane(&self) -> usize {
        self.window.stride * self.window.stride * self.rows * self.cols
    }

    /// `dst` ([`plane`](Phases::plane) floats) from the `h` × `w` plane `src`.
    fn fill(&self, src: &[f32], [h, w]: [usize; 2], dst: &mut [f32]) {
        let (s, [top, left]) = (self.window.stride, self.window.before);
        dst.fill(0.0);
        let size = self.rows * self.cols;
        for (y, row) in src.chunks_exact(w).take(h).enumerate() {
            let yy = y + top;
            // Padded column X = x + left goes to phase X % s, column X / s.
            let line = |px: usize| ((yy % s) * s + px) * size + (yy / s) * self.cols;
            if s == 2 {
                // Both phases in one pass over pairs of pixels (vectorized).
                let (lo, odd) = dst.split_at_mut(line(1));
                let even = &mut lo[line(0)..];
                // Pixel 2m goes to column m + left / 2 of phase left % 2, 2m + 1 to the other.
                let (first, second, a, b) = match left % 2 {
                    0 => (even, odd, left / 2, left / 2),
                    _ => (odd, even, left / 2, left / 2 + 1),
                };
                let pairs = w / 2;
                for ((pair, x0), x1) in row.chunks_exact(2).zip(&mut first[a..a + pairs]).zip(&mut second[b..b + pairs])
                {
                    *x0 = pair[0];
                    *x1 = pair[1];
                }
                if w % 2 == 1 {
                    first[a + pairs] = row[w - 1];
                }
                continue;
            }
            for (x, &v) in row.iter().enumerate() {
                let xx = x + left;
                dst[line(xx % s) + xx / s] = v;
            }
        }
    }

    /// For output pixels `pixels` of a map `ow` wide, the size² rows of NR values per input
    /// plane of `planes` that the window's taps multiply (row `size²·ci + size·dy + dx`), zero
    /// past the block's pixels.
    fn gather(&self, planes: &[f32], ow: usize, pixels: std::ops::Range<usize>, buf: &mut [f32]) {
        let (s, size, width) = (self.window.stride, self.window.size, pixels.len());
        for (plane, rows) in planes.chunks_exact(self.plane()).zip(buf.chunks_exact_mut(size * size * NR)) {
            // The block's pixels in stretches along output rows.
            let mut at = pixels.start;
            while at < pixels.end {
                let (oy, ox0) = (at / ow, at % ow);
                let len = (ow - ox0).min(pixels.end - at);
                let lane = at - pixels.start;
                for (tap, row) in rows.chunks_exact_mut(NR).enumerate() {
                    let (dy, dx) = (tap / size, tap % size);
                    let phase = ((dy % s) * s + dx % s) * self.rows * self.cols;
                    let from = phase + (oy + dy / s) * self.cols + ox0 + dx / s;
                    // Whole blocks and half blocks as constant-size copies (a call to memmove each
                    // otherwise).
                    match len {
                        NR => row.copy_from_slice(&plane[from..from + NR]),
                        8 => row[lane..lane + 8].copy_from_slice(&plane[from..from + 8]),
                        _ => row[lane..lane + len].copy_from_slice(&plane[from..from + len]),
                    }
                }
                at += len;
            }
            if width < NR {
                rows.chunks_exact_mut(NR).for_each(|row| row[width..].fill(0.0));
            }
        }
    }
}

/// The output, written by several threads at once, each only the pixels of its own items.
#[derive(Clone, Copy)]
struct Output(*mut f32, usize);

impl Output {
    /// A method, not a field access, so that closures capture the whole (`Sync`) value.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    fn len(self) -> usize {
        self.1
    }
}

// Safety: see the type's docs; items do not overlap.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

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
        let (xs, bias, [n, _, h, w]) = crate::conv::call_inputs("Pointwise", &self.bias, &inputs, [self.c, self.k])?;
        ensure!(gemm::available(), "Pointwise: this CPU lacks AVX2 and FMA");
        let Some([oh, ow]) = self.window.output([h, w]) else {
            bail!("Pointwise: a {:?} window does not fit a {h}x{w} map", self.window)
        };
        let mut y = unsafe { Tensor::uninitialized::<f32>(&[n, self.k, oh, ow])? };
        if n * h * w == 0 {
            return Ok(tvec!(y.into_tvalue()));
        }
        let mut out = y.try_as_plain_ram_mut()?;
        let out = out.as_slice_mut::<f32>()?;
        with_scratch(ctx, |scratch| self.run(xs, bias, [n, h, w], out, scratch))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Pointwise {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        crate::conv::output_facts(inputs, [self.c, self.k], self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn conv(c: usize, k: usize, strides: Option<TVec<usize>>) -> Conv {
        let pool_spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![1, 1],
            padding: PaddingSpec::Valid,
            dilations: None,
            strides,
            input_channels: c,
            output_channels: k,
        };
        Conv { pool_spec, kernel_fmt: KernelFormat::OIHW, group: 1, q_params: None }
    }

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
        assert_eq!(rewrite(&mut ours)?, 1, "not rewritten: n{n} c{c} k{k} {h}x{w}");
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
            (Pointwise::direct(&values(31 * c * 9, 36), Some(&bias3), 31, c, Window::square(3, 1)), &bias3, [1, 4, 4]),
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
        assert_eq!(f32s(&out[0], "input")?, f32s(&out[1], "const")?);
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

    #[test]
    fn leaves_strided_convolutions_alone() -> TractResult<()> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 8, 8]))?;
        let w = model.add_const("w", Tensor::zero::<f32>(&[4, 4, 1, 1])?)?;
        let b = model.add_const("b", Tensor::zero::<f32>(&[4])?)?;
        let y = model.wire_node("strided", conv(4, 4, Some(tvec![2, 2])), &[x, w, b])?;
        model.select_output_outlets(&y)?;
        let mut model = model;
        assert_eq!(rewrite(&mut model)?, 0);
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
        use crate::winograd::tests::{direct_window, random};
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
            let op = Pointwise::direct(&kernel, Some(&bias), k, c, g);
            let mut y = vec![f32::NAN; n * k * oh * ow];
            op.run(&x, &bias, [n, h, w], &mut y, &mut Default::default());
            let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-5, "n{n} c{c} k{k} {h}x{w} {g:?}: max abs error {worst}");
        }
    }

    /// A graph with a padded, stride-2 3×3 convolution (as exported from PyTorch): the strided
    /// rewrite takes it at batch 2 and more, leaves stride-1 ones to the others, and gives
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
            // Batch 1 stays with tract (no gain there).
            let rewritten = rewrite_strided(&mut ours)?;
            assert_eq!(rewritten, (n > 1) as usize, "n{n} {h}x{w}");
            let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
            assert_eq!(want[0].shape(), got[0].shape());
            let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
            let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "n{n} {h}x{w}: max abs difference {worst}");
        }
        Ok(())
    }
}
