//! 3×3 convolutions by Winograd's minimal filtering, F(2×2, 3×3) (Lavin & Gray 2016, "Fast
//! Algorithms for Convolutional Neural Networks").
//!
//! Why: the shipped UNets spend most of a call in 3×3, stride-1, padding-1 convolutions, which
//! tract runs as im2col + matrix product (9 multiply-adds per input channel and output pixel).
//! F(2×2, 3×3) computes each 2×2 output tile from a 4×4 input tile with 16 instead of 36
//! products per channel pair: the work becomes 16 independent matrix products that are 2.25×
//! smaller in total, plus cheap linear transforms of the input and output tiles.
//!
//! `crate::passes::winograd` swaps such tract `Conv` nodes for [`Winograd3x3`] in a decluttered
//! graph, before tract optimizes it. In float32 the transforms add a rounding error of a few 1e-7 relative,
//! below the difference between tract and onnxruntime.
//!
//! F(4×4, 3×3) (36 products, 4× fewer multiplications) was tried and measured slower here: on
//! 8×8–32×32 maps it leaves matrix products of only 4–64 tile columns, and its transforms cost
//! more per pixel. Tried again in the block layout with AVX-512, for the 35.7M UNet's large
//! layers only: slower on its 16×16 maps (its 36·k·c weights come from memory for one block
//! of 16 tiles), and slower on its 32×32 maps alone too.
//!
//! Layout: the weights are stored as `U[ξ][k][c]` (ξ: one of the 16 tile positions, k, c:
//! output and input channel), and 16 products `M[ξ] = U[ξ] · V[ξ]` with the transformed input
//! `V[ξ][c][t]` (t: tile index over batch × tile rows × tile columns) give `M[ξ][k][t]`, which
//! the output transform turns into 2×2 pixels.
//! - On x86-64 with AVX2 and FMA (`crate::kernels::x86_64::winograd`): blocks of 16 tiles go through all three stages at
//!   once, so `V` and `M` stay in L1/L2; the products on our own kernel (`gemm`, `U` packed for
//!   it once at load), the transforms in AVX2 intrinsics.
//! - On aarch64, and on x86-64 for AVX2's large layers: the whole `V`, then the 16 whole
//!   products on our kernel (NEON's micro-kernel on aarch64), then the output transform.
//!   Tiles of one tile row are contiguous in `t`: the transforms run along whole rows, which
//!   the compiler vectorizes (`crate::kernels::portable::winograd`), or on aarch64 four tiles
//!   to a NEON register (`crate::kernels::aarch64::winograd`).
//! - Elsewhere (32-bit ARM): the same layout, with the products on `matrixmultiply`.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

#[cfg(test)]
use super::packed::Packer;
use super::packed::{Packed, Site};
use super::scratch::{output, recycle, with_scratch, Scratch};
use super::{for_each, threads};
#[cfg(target_arch = "aarch64")]
use crate::kernels::aarch64::winograd::{input_transform, output_transform};
#[cfg(target_arch = "arm")]
use crate::kernels::arm::winograd::{input_transform, output_transform};
#[cfg(own_gemm)]
use crate::kernels::gemm;
use crate::kernels::portable::winograd::transform_kernel;
#[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
use crate::kernels::portable::winograd::{input_transform, output_transform};
#[cfg(target_arch = "x86_64")]
use crate::kernels::x86_64::winograd as fused;
use crate::kernels::{carve, split, Window};

/// A 3×3, stride-1, padding-1 convolution computed by F(2×2, 3×3); see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Winograd3x3 {
    k: usize,
    c: usize,
    /// `U[ξ]` for each ξ: packed for our kernel (`gemm::pack_weights`) where the CPU runs it,
    /// else plain `[k][c]` for `matrixmultiply`; float32 `[16, …]`.
    weights: Packed,
    /// Which of the two.
    own_kernel: bool,
    /// Products in float16 (`gemm::product_f16`, weights rounded to float16): only where the
    /// CPU has FP16 arithmetic.
    half_products: bool,
    /// One bias per output channel, float32 `[k]`; `None`: the node's second input, `k` values.
    #[serde(with = "super::serial::tensor::option")]
    bias: Option<Arc<Tensor>>,
}

impl Winograd3x3 {
    /// The operator for an OIHW `[k, c, 3, 3]` kernel and `k` biases (`None`: given at run time).
    #[cfg(test)]
    pub(crate) fn new(kernel: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        Self::new_in(Site { packer: &Packer::default(), node: "", origin: None }, kernel, bias, k, c)
    }

    /// [`Self::new`] with the transformed weights from the packer, for the node `site` names;
    /// with float16 products where the site asks for them and the CPU has FP16 arithmetic.
    pub(crate) fn new_in(site: Site, kernel: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        #[cfg(own_gemm)]
        let own_kernel = gemm::available();
        #[cfg(not(own_gemm))]
        let own_kernel = false;
        let half = site.half_products();
        Self::with_products(site, kernel, bias, [k, c], own_kernel, half)
    }

    /// [`Self::new_in`], with the products on our kernel (only where it is available) or on
    /// `matrixmultiply`.
    fn with_products(
        site: Site,
        kernel: &[f32],
        bias: Option<&[f32]>,
        [k, c]: [usize; 2],
        own_kernel: bool,
        half_products: bool,
    ) -> Self {
        let kind = if own_kernel { "winograd3x3" } else { "winograd3x3-plain" };
        let weights = site.get(kind, kernel, || {
            #[allow(unused_mut)] // only where our kernel runs
            let mut u = transform_kernel(kernel, k, c);
            #[cfg(own_gemm)]
            if own_kernel {
                u = u.chunks_exact(k * c).flat_map(|ui| gemm::pack_weights(ui, k, c)).collect();
            }
            u
        });
        let weights = if half_products { weights.into_half() } else { weights };
        Winograd3x3 { k, c, weights, own_kernel, half_products, bias: bias.map(|b| Arc::new(tensor1(b))) }
    }
}

impl Op for Winograd3x3 {
    fn name(&self) -> StaticName {
        "Winograd3x3".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("F(2x2,3x3), {} -> {} channels", self.c, self.k)])
    }

    op_as_typed_op!();
}

impl EvalOp for Winograd3x3 {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.weights.prefetch_next();
        let (xs, bias, [n, _, h, w]) = super::conv::call_inputs("Winograd3x3", &self.bias, &inputs, [self.c, self.k])?;
        let mut y = output(ctx, &[n, self.k, h, w])?;
        let mut out = y.try_as_plain_ram_mut()?;
        let out = out.as_slice_mut::<f32>()?;
        with_scratch(ctx, |scratch| self.run(xs, bias, [n, h, w], out, scratch))?;
        if let Some(x) = inputs.into_iter().next() {
            recycle(ctx, x);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Winograd3x3 {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        super::conv::output_facts(inputs, [self.c, self.k], Window::square(3, 1))
    }
}

impl Winograd3x3 {
    /// `x`: `[n, c, h, w]`, `y`: `[n, k, h, w]`, both C-order; `bias`: `k` values.
    fn run(&self, x: &[f32], bias: &[f32], [n, h, w]: [usize; 3], y: &mut [f32], scratch: &mut Scratch) {
        let (k, c) = (self.k, self.c);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let t = n * th * tw;
        let u = self.weights.floats();
        let parts = threads();
        // Float16 weights always run in blocks, which widen a few panels at a time: the
        // whole-map layout would widen a whole matrix per product.
        #[cfg(target_arch = "x86_64")]
        if self.own_kernel && (runs_in_blocks(gemm::Kernel::detect(), k, c) || self.weights.is_half()) {
            // Blocks of 16 tiles through all three stages at once (`fused`), split between
            // the threads; each thread has its own part of the scratch.
            let large = 16 * k * c > LARGE;
            // A large layer's weights come from L3 or memory: a chunk of blocks reads each panel
            // once for all of them. 4 blocks: 8 was faster on one thread but slower on two.
            // Float16 weights take chunks too, so that each widened panel serves 4 blocks.
            let chunk = if large || self.weights.is_half() { 4 } else { 1 };
            let d = fused::Dims { n, c, k, h, w, chunk };
            // With fewer blocks than threads, or in a large layer, the threads also split the
            // output channels.
            let groups = if large { parts } else { parts.div_ceil(d.blocks()) }.min(d.panels());
            let ranges = split(d.chunks() * groups, parts);
            let need = ranges.len() * d.scratch_len();
            if scratch.v.len() < need {
                scratch.v.resize(need, 0.0);
            }
            let pieces = scratch.v[..need].chunks_mut(d.scratch_len());
            let call = fused::Call { u, bias, x, y: fused::Output::new(y), d, groups };
            let kernel = gemm::Kernel::detect();
            for_each(ranges.into_iter().zip(pieces).collect(), |(r, s)| fused::run(kernel, call, r, s));
            return;
        }
        {
            #[cfg(target_arch = "aarch64")]
            let Scratch { v, m, h: vh } = scratch;
            #[cfg(not(target_arch = "aarch64"))]
            let Scratch { v, m } = scratch;
            for (buf, len) in [(&mut *v, 16 * c * t), (&mut *m, 16 * k * t)] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            let (v, m) = (&mut v[..16 * c * t], &mut m[..16 * k * t]);

            // Input transform, the channels split between the threads: part i writes, in each
            // of the 16 blocks v[ξ], the rows of its channels.
            let ranges = split(c, parts);
            let mut outs: Vec<Vec<&mut [f32]>> = ranges.iter().map(|_| Vec::with_capacity(16)).collect();
            for block in v.chunks_mut(c * t) {
                for (out, mine) in outs.iter_mut().zip(carve(block, ranges.iter().map(|r| r.len() * t))) {
                    out.push(mine);
                }
            }
            for_each(ranges.iter().cloned().zip(outs).collect(), |(r, mut out)| {
                input_transform(x, [n, c, h, w], r, &mut out)
            });

            // The 16 products, independent of each other.
            let v = &*v;
            #[cfg(target_arch = "aarch64")]
            if let (true, crate::kernels::Floats::F16(u)) = (self.half_products, u) {
                let len = u.len() / 16;
                // Each product rounds its V[ξ] to float16 first.
                if vh.len() < 16 * c * t {
                    vh.resize(16 * c * t, f16::ZERO);
                }
                let work = m.chunks_mut(k * t).zip(vh.chunks_mut(c * t)).enumerate().collect();
                for_each(work, |(xi, (p, vh))| {
                    // Safety: `half_products` only where the CPU has FP16 arithmetic.
                    unsafe { crate::kernels::aarch64::gemm_f16::narrow(&v[xi * c * t..][..c * t], vh) };
                    gemm::product_f16(&u[xi * len..][..len], vh, p, [k, c, t]);
                });
            } else {
                self.products(u, v, m, [k, c, t]);
            }
            #[cfg(not(target_arch = "aarch64"))]
            self.products(u, v, m, [k, c, t]);

            // Output transform, the output planes split between the threads.
            let m = &*m;
            let ranges = split(n * k, parts);
            let pieces = carve(y, ranges.iter().map(|r| r.len() * h * w));
            for_each(ranges.into_iter().zip(pieces).collect(), |(r, out)| {
                output_transform(m, bias, [n, k, h, w], r, out)
            });
        }
    }

    /// The 16 float32 products `m[ξ] = u[ξ] · v[ξ]`, on our kernel or `matrixmultiply`.
    fn products(&self, u: crate::kernels::Floats, v: &[f32], m: &mut [f32], [k, c, t]: [usize; 3]) {
        let len = u.len() / 16;
        for_each(m.chunks_mut(k * t).enumerate().collect(), |(xi, p)| {
            let mut wide = Vec::new();
            let (u, v) = (u.widen(xi * len..(xi + 1) * len, &mut wide), &v[xi * c * t..][..c * t]);
            if self.own_kernel {
                #[cfg(own_gemm)]
                return gemm::product(gemm::Kernel::detect(), u, v, p, [k, c, t]);
            }
            let a = ArrayView2::from_shape((k, c), u).expect("U shape");
            let b = ArrayView2::from_shape((c, t), v).expect("V shape");
            let mut p = ArrayViewMut2::from_shape((k, t), p).expect("M shape");
            general_mat_mul(1.0, &a, &b, 0.0, &mut p);
        });
    }
}

/// Whether a layer of `k` × `c` channels runs in blocks (`fused`) on `kernel`. Each block reads
/// all the transformed weights (16·k·c floats) that its thread's panels need. With AVX2 that
/// pays while they stay in L2 (1 MB here: 128 → 128 channels), and larger layers (the 35.7M
/// UNet's 256 channels) run the whole-map layout, where each of the 16 products reuses its own
/// matrix across all tiles. With AVX-512 every layer runs in blocks: on the 35.7M UNet the
/// convolutions were faster in blocks than in the whole-map layout, the 4 MB of a 256 → 256
/// layer read from L3 for each block notwithstanding. (On two threads such layers split their output channels, see [`LARGE`].)
#[cfg(target_arch = "x86_64")]
fn runs_in_blocks(kernel: gemm::Kernel, k: usize, c: usize) -> bool {
    kernel == gemm::Kernel::Avx512 || 16 * k * c <= LARGE
}

/// Transformed weights (floats) above which a layer is large: its threads take every block
/// each, for their own share of the output channels, rather than blocks of their own, so that
/// each reads a share of the weights rather than all of them. On the 35.7M UNet's 256-channel
/// layers at two threads, splitting the blocks between the threads was slower than the
/// whole-map layout; splitting the output channels was faster than both.
#[cfg(own_gemm)]
pub(crate) const LARGE: usize = 16 * 128 * 128;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{direct, random};

    fn op_for(kernel: &[f32], bias: &[f32], k: usize, c: usize) -> Winograd3x3 {
        Winograd3x3::new(kernel, Some(bias), k, c)
    }

    /// Both ways of running the products, where this CPU has both.
    fn ops_for(kernel: &[f32], bias: &[f32], k: usize, c: usize) -> Vec<Winograd3x3> {
        #[allow(unused_mut)] // only where our kernel runs
        let mut ops = vec![Winograd3x3::with_products(
            Site { packer: &Packer::default(), node: "", origin: None },
            kernel,
            Some(bias),
            [k, c],
            false,
            false,
        )];
        #[cfg(own_gemm)]
        if gemm::available() {
            ops.push(Winograd3x3::with_products(
                Site { packer: &Packer::default(), node: "", origin: None },
                kernel,
                Some(bias),
                [k, c],
                true,
                false,
            ));
        }
        ops
    }

    fn check(n: usize, c: usize, k: usize, h: usize, w: usize) {
        let x = random(n * c * h * w, 1);
        let kernel = random(k * c * 9, 2);
        let bias = random(k, 3);
        let want = direct(&x, &kernel, &bias, [n, c, h, w], k);
        for op in ops_for(&kernel, &bias, k, c) {
            // The scratch first serves a larger layer, as in a plan: nothing stale may leak in.
            let mut scratch = Scratch::default();
            let big = op_for(&random(7 * 9 * 9, 7), &random(7, 8), 7, 9);
            big.run(&random(9 * 12 * 14, 9), &random(7, 8), [1, 12, 14], &mut vec![0f32; 7 * 12 * 14], &mut scratch);
            let mut y = vec![f32::NAN; n * k * h * w];
            op.run(&x, &bias, [n, h, w], &mut y, &mut scratch);
            let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            // Sums of 9·c products of values in [-1, 1]: f32 rounding alone is a few 1e-6.
            let own = op.own_kernel;
            assert!(worst < 1e-4 * (c as f64).sqrt(), "n{n} c{c} k{k} {h}x{w} own kernel {own}: max abs error {worst}");
        }
    }

    #[test]
    fn matches_direct_convolution() {
        check(1, 3, 5, 8, 8);
        check(2, 4, 3, 6, 10);
        check(1, 32, 16, 16, 16);
        // Channels not a multiple of the kernel's 6, tiles not of its 16.
        check(1, 13, 19, 14, 18);
        // Tile rows longer than a block of 16 tiles, and blocks that span two images.
        check(2, 5, 7, 6, 40);
        check(3, 3, 4, 10, 10);
        // Weights above what AVX2 runs in blocks: the whole-map layout on our kernel there.
        check(1, 130, 131, 6, 5);
    }

    #[cfg(feature = "multithread")]
    #[test]
    fn threads_split_the_work_without_changing_a_bit() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        // 30 tiles: 2 blocks, fewer than 3 threads, which then split the output channels too;
        // and a large layer (more weights than `LARGE`), where the threads split the output
        // channels of every block (with AVX-512), or the 16 products (whole-map layout).
        for (n, c, k, h, w) in [(2, 7, 13, 6, 9), (1, 131, 130, 9, 10)] {
            let x = random(n * c * h * w, 4);
            let bias = random(k, 6);
            let op = op_for(&random(k * c * 9, 5), &bias, k, c);
            let mut one = vec![0f32; n * k * h * w];
            op.run(&x, &bias, [n, h, w], &mut one, &mut Scratch::default());
            for threads in [2, 3] {
                let mut many = vec![f32::NAN; n * k * h * w];
                multithread_tract_scope(Executor::multithread(threads), || {
                    op.run(&x, &bias, [n, h, w], &mut many, &mut Scratch::default())
                });
                assert_eq!(one, many, "c{c} k{k}: {threads} threads");
            }
        }
    }

    /// Float16 weights give the bits of float32 weights rounded to float16, on every way of
    /// running the products (blocks and the whole-map layout), and stay near the f64 result.
    #[test]
    fn half_weights_give_the_bits_of_their_rounding() {
        for (n, c, k, h, w) in [(1, 13, 19, 14, 18), (2, 5, 7, 6, 40), (1, 130, 131, 6, 5)] {
            let x = random(n * c * h * w, 1);
            let kernel = random(k * c * 9, 2);
            let bias = random(k, 3);
            let want = direct(&x, &kernel, &bias, [n, c, h, w], k);
            for own_kernel in [false, true] {
                #[cfg(own_gemm)]
                if own_kernel && !gemm::available() {
                    continue;
                }
                #[cfg(not(own_gemm))]
                if own_kernel {
                    continue;
                }
                let half = Packer::default();
                half.set_half(true);
                let site = Site { packer: &half, node: "", origin: None };
                let op = Winograd3x3::with_products(site, &kernel, Some(&bias), [k, c], own_kernel, false);
                assert!(op.weights.is_half());
                let mut rounded = Winograd3x3::with_products(
                    Site { packer: &Packer::default(), node: "", origin: None },
                    &kernel,
                    Some(&bias),
                    [k, c],
                    own_kernel,
                    false,
                );
                rounded.weights = Packed::heap(op.weights.to_vec());
                let run = |op: &Winograd3x3| {
                    let mut y = vec![f32::NAN; n * k * h * w];
                    op.run(&x, &bias, [n, h, w], &mut y, &mut Scratch::default());
                    y
                };
                let (a, b) = (run(&op), run(&rounded));
                let same = a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits());
                // Taken in blocks when half on x86-64; the whole-map layout for the large f32
                // layer on AVX2, whose sums run in another order.
                #[cfg(target_arch = "x86_64")]
                let blocks_both = !own_kernel || runs_in_blocks(gemm::Kernel::detect(), k, c);
                #[cfg(not(target_arch = "x86_64"))]
                let blocks_both = true;
                if blocks_both {
                    assert!(same, "n{n} c{c} k{k} {h}x{w} own kernel {own_kernel}");
                }
                let worst = a.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                // Each weight off by up to 2^-11 of itself.
                assert!(worst < 3e-3 * (c as f64).sqrt(), "n{n} c{c} k{k}: max abs error {worst}");
                assert!(worst > 1e-6, "the weights were not rounded: max abs error {worst}");
            }
        }
    }

    /// Float16 products against the float64 convolution, with one and three threads giving the
    /// same bits.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn half_products_stay_near_the_float64_convolution() {
        if !gemm::half_available() {
            eprintln!("no FP16 arithmetic here: nothing to run");
            return;
        }
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        for (n, c, k, h, w) in [(1, 13, 19, 14, 18), (2, 5, 7, 6, 40), (1, 130, 131, 6, 5), (3, 1, 1, 1, 1)] {
            let x = random(n * c * h * w, 1);
            let kernel = random(k * c * 9, 2);
            let bias = random(k, 3);
            let want = direct(&x, &kernel, &bias, [n, c, h, w], k);
            let packer = Packer::default();
            packer.set_half_products(true);
            let op = Winograd3x3::new_in(Site { packer: &packer, node: "", origin: None }, &kernel, Some(&bias), k, c);
            assert!(op.half_products && op.weights.is_half());
            let mut y = vec![f32::NAN; n * k * h * w];
            op.run(&x, &bias, [n, h, w], &mut y, &mut Scratch::default());
            let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            // Operands and sums in float16: about 2^-11 of sums of up to 9·c terms of size ≤ 1.
            assert!(worst < 4e-3 * (9.0 * c as f64).sqrt(), "n{n} c{c} k{k} {h}x{w}: max abs error {worst}");
            let mut three = vec![f32::NAN; n * k * h * w];
            multithread_tract_scope(Executor::multithread(3), || {
                op.run(&x, &bias, [n, h, w], &mut three, &mut Scratch::default())
            });
            assert!(y.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()), "c{c} k{k}: 3 threads");
        }
    }

    #[test]
    fn odd_sizes_and_single_pixels() {
        check(1, 2, 3, 5, 7);
        check(3, 1, 1, 1, 1);
        check(1, 4, 2, 3, 2);
    }
}
