//! 3×3 convolutions by Winograd's minimal filtering, F(2×2, 3×3) (Lavin & Gray 2016, "Fast
//! Algorithms for Convolutional Neural Networks").
//!
//! Why: the shipped UNets spend most of a call in 3×3, stride-1, padding-1 convolutions, which
//! tract runs as im2col + matrix product (9 multiply-adds per input channel and output pixel).
//! F(2×2, 3×3) computes each 2×2 output tile from a 4×4 input tile with 16 instead of 36
//! products per channel pair: the work becomes 16 independent matrix products that are 2.25×
//! smaller in total, plus cheap linear transforms of the input and output tiles.
//!
//! [`rewrite`] swaps such tract `Conv` nodes for [`Winograd3x3`] in a decluttered graph, before
//! tract optimizes it. In float32 the transforms add a rounding error of a few 1e-7 relative,
//! below the difference between tract and onnxruntime.
//!
//! F(4×4, 3×3) (36 products, 4× fewer multiplications) was tried and measured slower here
//! (student step 17.4–19.3 against 15.1 ms): on 8×8–32×32 maps it leaves matrix products of
//! only 4–64 tile columns, and its transforms cost more per pixel. Tried again in the block
//! layout with AVX-512, for the 35.7M UNet's large layers only: slower on its 16×16 maps
//! (a 256 → 256 layer 1.0 → 1.2–1.4 ms: its 36·k·c weights come from memory for one block of
//! 16 tiles), and on its 32×32 maps alone the step went from 48.7–49.8 to 52.3–52.4 ms
//! (`tools/bench_compare.py`, alternating sittings).
//!
//! Layout: the weights are stored as `U[ξ][k][c]` (ξ: one of the 16 tile positions, k, c:
//! output and input channel), and 16 products `M[ξ] = U[ξ] · V[ξ]` with the transformed input
//! `V[ξ][c][t]` (t: tile index over batch × tile rows × tile columns) give `M[ξ][k][t]`, which
//! the output transform turns into 2×2 pixels.
//! - On x86-64 with AVX2 and FMA (`fused`): blocks of 16 tiles go through all three stages at
//!   once, so `V` and `M` stay in L1/L2; the products on our own kernel (`gemm`, `U` packed for
//!   it once at load), the transforms in AVX2 intrinsics.
//! - Elsewhere (aarch64): the whole `V`, then 16 whole products on `matrixmultiply`, then the
//!   output transform. Tiles of one tile row are contiguous in `t`, so both transforms run along
//!   whole rows, which the compiler vectorizes.

use std::sync::Mutex;

#[cfg(target_arch = "x86_64")]
mod fused;

use crate::conv::Window;
#[cfg(target_arch = "x86_64")]
use crate::gemm;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use tract_linalg::multithread::current_tract_executor;
#[cfg(feature = "multithread")]
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::tract_itertools::Itertools;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Whether this build has a fast matrix product for the 16 products: our kernel or
/// `matrixmultiply`'s AVX2+FMA one on x86-64, `matrixmultiply`'s NEON one on aarch64; for 32-bit
/// ARM `matrixmultiply` has only a generic kernel, and tract's own NEON kernels are faster.
pub const PAYS_OFF: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Replaces every float32 3×3, stride-1, padding-1, ungrouped NCHW convolution with constant
/// weights by a [`Winograd3x3`] node. Returns how many were replaced.
///
/// The bias may be computed: tract folds a per-channel add after a convolution into its bias
/// (diffusers' ResNet blocks add the time embedding right after `conv1`), and such a node then
/// takes the bias as its second input.
///
/// On x86-64, large layers on small maps go to [`crate::pointwise::Pointwise`] instead, as
/// direct convolutions: see [`direct_pays`].
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    crate::conv::rewrite(model, "Winograd3x3", |f| -> Option<Box<dyn TypedOp>> {
        if f.window != Window::square(3, 1) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        if direct_pays(f.k, f.c, f.map) {
            return Some(Box::new(crate::pointwise::Pointwise::direct(
                f.kernel,
                f.bias.as_deref(),
                f.k,
                f.c,
                f.window,
            )));
        }
        Some(Box::new(Winograd3x3::new(f.kernel, f.bias.as_deref(), f.k, f.c)))
    })
}

/// Whether a 3×3 convolution of `k` × `c` channels over an `h` × `w` map runs faster as a
/// direct convolution on our kernel (`pointwise`: 9 products per pixel and channel pair) than
/// by Winograd: for large layers (see [`LARGE`]) on maps of at most [`SMALL`] pixels. Such a
/// layer reads its weights from memory on every call (the 35.7M UNet's do not fit in L3
/// together), F(2×2) 16·k·c of them and the direct convolution 9·k·c; and on a 4×4 map
/// F(2×2)'s 4 tiles fill only a quarter of a 16-tile block, so it does 16 products per pixel
/// against 9.
///
/// On the 35.7M UNet (`profile_ops`, 1 thread) the 14 such layers on its 4×4 maps took 8.7 ms a
/// call by F(2×2) and 3.6 ms directly. On its 8×8 maps the direct convolution was slower (7.5–7.9
/// against 7.1 ms for 11 layers, also with each panel of weights read once for 4 blocks).
#[cfg(target_arch = "x86_64")]
fn direct_pays(k: usize, c: usize, [h, w]: [usize; 2]) -> bool {
    gemm::available() && 16 * k * c > LARGE && h * w <= SMALL
}

/// See [`direct_pays`].
#[cfg(target_arch = "x86_64")]
const SMALL: usize = 16;

/// `U = G g Gᵀ` for every (output, input) channel pair, stored as `[16][k][c]`.
fn transform_kernel(kernel: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * k * c];
    for (kc, g) in kernel.chunks_exact(9).enumerate() {
        // G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]; first G g (4×3), then (G g) Gᵀ (4×4).
        let mut gg = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            gg[0][j] = g0;
            gg[1][j] = 0.5 * (g0 + g1 + g2);
            gg[2][j] = 0.5 * (g0 - g1 + g2);
            gg[3][j] = g2;
        }
        for (i, row) in gg.iter().enumerate() {
            let [r0, r1, r2] = *row;
            let out = [r0, 0.5 * (r0 + r1 + r2), 0.5 * (r0 - r1 + r2), r2];
            for (j, v) in out.into_iter().enumerate() {
                u[(i * 4 + j) * k * c + kc] = v;
            }
        }
    }
    u
}

/// A 3×3, stride-1, padding-1 convolution computed by F(2×2, 3×3); see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Winograd3x3 {
    k: usize,
    c: usize,
    /// `U[ξ]` for each ξ: packed for our kernel (`gemm::pack_weights`) where the CPU runs it,
    /// else plain `[k][c]` for `matrixmultiply`; float32 `[16, …]`.
    weights: Arc<Tensor>,
    /// Which of the two.
    own_kernel: bool,
    /// One bias per output channel, float32 `[k]`; `None`: the node's second input, `k` values.
    bias: Option<Arc<Tensor>>,
}

impl Winograd3x3 {
    /// The operator for an OIHW `[k, c, 3, 3]` kernel and `k` biases (`None`: given at run time).
    fn new(kernel: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        let own_kernel = gemm::available();
        #[cfg(not(target_arch = "x86_64"))]
        let own_kernel = false;
        Self::with_products(kernel, bias, k, c, own_kernel)
    }

    /// [`Self::new`], with the products on our kernel (only where it is available) or on
    /// `matrixmultiply`.
    fn with_products(kernel: &[f32], bias: Option<&[f32]>, k: usize, c: usize, own_kernel: bool) -> Self {
        #[allow(unused_mut)] // only x86-64 repacks
        let mut u = transform_kernel(kernel, k, c);
        #[cfg(target_arch = "x86_64")]
        if own_kernel {
            u = u.chunks_exact(k * c).flat_map(|ui| gemm::pack_weights(ui, k, c)).collect();
        }
        let len = u.len();
        Winograd3x3 {
            k,
            c,
            weights: Arc::new(Tensor::from_shape(&[16, len / 16], &u).expect("16 matrices")),
            own_kernel,
            bias: bias.map(|b| Arc::new(tensor1(b))),
        }
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
        let (xs, bias, [n, _, h, w]) = crate::conv::call_inputs("Winograd3x3", &self.bias, &inputs, [self.c, self.k])?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(&[n, self.k, h, w])? };
        let mut out = y.try_as_plain_ram_mut()?;
        let out = out.as_slice_mut::<f32>()?;
        with_scratch(ctx, |scratch| self.run(xs, bias, [n, h, w], out, scratch))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Winograd3x3 {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        crate::conv::output_facts(inputs, [self.c, self.k], Window::square(3, 1))
    }
}

/// A float32 tensor's elements, in C order; `op` names the operator in the error.
pub(crate) fn f32s<'t>(t: &'t Tensor, op: &str) -> TractResult<&'t [f32]> {
    ensure!(t.strides() == &*Tensor::natural_strides(t.shape()), "{op}: a strided tensor");
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// Buffers for one call: the transformed input `V` and the products `M`. They grow only:
/// shrinking and growing again would zero-fill on every layer.
#[derive(Default)]
pub struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
}

/// One [`Scratch`] for all the Winograd nodes of a plan state, kept in its turn state.
///
/// Why there: it lives exactly as long as the state, whichever pool thread runs a call, so the
/// heap stops growing after the state's first call (a thread-local scratch grew again whenever
/// another pool worker first took a call, which made the 2-thread heap check flaky on a busy
/// machine), and states run side by side (concurrent guidance) each have their own. The lock
/// is never contended: a state runs one node at a time.
struct SharedScratch(Mutex<Scratch>);

/// Runs `f` on the scratch of the plan state that runs `ctx`, or on a fresh one when the state
/// has none.
pub(crate) fn with_scratch<R>(ctx: &EvalContext, f: impl FnOnce(&mut Scratch) -> R) -> TractResult<R> {
    match ctx.shared.and_then(|shared| shared.get::<SharedScratch>()) {
        Some(SharedScratch(held)) => {
            let mut scratch = held.lock().map_err(|_| format_err!("a poisoned scratch"))?;
            Ok(f(&mut scratch))
        }
        None => Ok(f(&mut Scratch::default())),
    }
}

#[cfg(target_arch = "x86_64")] // only `pointwise` asks for plain floats
impl Scratch {
    /// `len` floats of the buffer, grown when short; what they hold is left over from before.
    pub(crate) fn floats(&mut self, len: usize) -> &mut [f32] {
        if self.v.len() < len {
            self.v.resize(len, 0.0);
        }
        &mut self.v[..len]
    }
}

/// Gives `state` the buffers its Winograd and 1×1 convolution nodes share. Without them each call allocates its own.
pub fn install_scratch(state: &mut TypedSimpleState) {
    state.turn_state.shared.insert(SharedScratch(Mutex::new(Scratch::default())));
}

impl Winograd3x3 {
    /// `x`: `[n, c, h, w]`, `y`: `[n, k, h, w]`, both C-order; `bias`: `k` values.
    fn run(&self, x: &[f32], bias: &[f32], [n, h, w]: [usize; 3], y: &mut [f32], scratch: &mut Scratch) {
        let (k, c) = (self.k, self.c);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let t = n * th * tw;
        let u = f32s(&self.weights, "Winograd3x3").expect("f32 weights");
        let parts = threads();
        #[cfg(target_arch = "x86_64")]
        if self.own_kernel && runs_in_blocks(gemm::Kernel::detect(), k, c) {
            // Blocks of 16 tiles through all three stages at once (`fused`), split between
            // the threads; each thread has its own part of the scratch.
            let large = 16 * k * c > LARGE;
            // A large layer's weights come from L3 or memory: a chunk of blocks reads each panel
            // once for all of them. On the 35.7M UNet (`profile_ops`, three rounds of 20 calls):
            // 1 thread, chunks of 1/4/8 blocks 43.9–48.5/43.3–46.9/42.2–43.3 ms in the
            // convolutions; 2 threads, the call 31.6–31.8/30.8–31.4/33.1–33.5 ms.
            let chunk = if large { 4 } else { 1 };
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
            let len = u.len() / 16;
            for_each(m.chunks_mut(k * t).enumerate().collect(), |(xi, p)| {
                let (u, v) = (&u[xi * len..][..len], &v[xi * c * t..][..c * t]);
                if self.own_kernel {
                    #[cfg(target_arch = "x86_64")]
                    return gemm::product(gemm::Kernel::detect(), u, v, p, [k, c, t]);
                }
                let a = ArrayView2::from_shape((k, c), u).expect("U shape");
                let b = ArrayView2::from_shape((c, t), v).expect("V shape");
                let mut p = ArrayViewMut2::from_shape((k, t), p).expect("M shape");
                general_mat_mul(1.0, &a, &b, 0.0, &mut p);
            });

            // Output transform, the output planes split between the threads.
            let m = &*m;
            let ranges = split(n * k, parts);
            let pieces = carve(y, ranges.iter().map(|r| r.len() * h * w));
            for_each(ranges.into_iter().zip(pieces).collect(), |(r, out)| {
                output_transform(m, bias, [n, k, h, w], r, out)
            });
        }
    }
}

/// `0..len` in `parts` nearly equal ranges (fewer when `len` is small).
pub(crate) fn split(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    (0..parts).map(|i| i * len / parts..(i + 1) * len / parts).collect()
}

/// `rest` cut into consecutive pieces of the given lengths.
pub(crate) fn carve(mut rest: &mut [f32], lens: impl IntoIterator<Item = usize>) -> Vec<&mut [f32]> {
    lens.into_iter()
        .map(|len| {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            piece
        })
        .collect()
}

/// Whether a layer of `k` × `c` channels runs in blocks (`fused`) on `kernel`. Each block reads
/// all the transformed weights (16·k·c floats) that its thread's panels need. With AVX2 that
/// pays while they stay in L2 (1 MB here: 128 → 128 channels), and larger layers (the 35.7M
/// UNet's 256 channels) run the whole-map layout, where each of the 16 products reuses its own
/// matrix across all tiles. With AVX-512 every layer runs in blocks: on the 35.7M UNet
/// (`profile_ops`, 1 thread) the convolutions took 54 ms a call in the whole-map layout and
/// 44.5–48 ms in blocks, the 4 MB of a 256 → 256 layer read from L3 for each block
/// notwithstanding. (On two threads such layers split their output channels, see [`LARGE`].)
#[cfg(target_arch = "x86_64")]
fn runs_in_blocks(kernel: gemm::Kernel, k: usize, c: usize) -> bool {
    kernel == gemm::Kernel::Avx512 || 16 * k * c <= LARGE
}

/// Transformed weights (floats) above which a layer is large: its threads take every block
/// each, for their own share of the output channels, rather than blocks of their own, so that
/// each reads a share of the weights rather than all of them. Splitting the blocks of the
/// 35.7M UNet's 256-channel layers between two threads took the step from 33.5–34.1 ms (the
/// whole-map layout) to 38.4–39.7 ms (`tools/bench_compare.py`); splitting their output
/// channels, to 31.0–32.0 ms.
#[cfg(target_arch = "x86_64")]
const LARGE: usize = 16 * 128 * 128;

/// Threads of the executor the plan runs on.
pub(crate) fn threads() -> usize {
    match current_tract_executor() {
        #[cfg(feature = "multithread")]
        Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

/// Runs `f` on each item, on the plan's thread pool when it has one.
pub(crate) fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Send + Sync) {
    match current_tract_executor() {
        #[cfg(feature = "multithread")]
        Executor::MultiThread(pool) if items.len() > 1 => {
            use rayon::prelude::*;
            pool.install(|| items.into_par_iter().for_each(f))
        }
        _ => items.into_iter().for_each(f),
    }
}

/// `V = Bᵀ d B` for every 4×4 input tile `d` (zero outside the image), into `v[ξ][c][t]`.
///
/// Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. Tile `tx` covers padded columns
/// `2tx .. 2tx+4`, so its columns are even, odd, even, odd columns `tx, tx, tx+1, tx+1` of the
/// padded plane: splitting the plane into its even and odd columns first turns the column
/// transform into contiguous, vectorizable loops over `tx`.
///
/// Only the channels in `channels`: `v[ξ]` holds their rows, `(ci − channels.start)·t + tile`.
fn input_transform(x: &[f32], [n, c, h, w]: [usize; 4], channels: std::ops::Range<usize>, v: &mut [&mut [f32]]) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let t = n * th * tw;
    // Zero-padded plane, 1 pixel before and 1–2 after, as its even and odd columns.
    let (ph, cw) = (2 * th + 2, tw + 1);
    let mut even = vec![0f32; ph * cw];
    let mut odd = vec![0f32; ph * cw];
    let mut rows = vec![0f32; 8 * cw];
    for (b, ci) in (0..n).cartesian_product(channels.clone()) {
        let src = &x[(b * c + ci) * h * w..][..h * w];
        let row_at = (ci - channels.start) * t;
        for (i, line) in src.chunks_exact(w).enumerate() {
            // Padded column p is input column p − 1: odd columns hold the even input columns.
            let (e, o) = (&mut even[(i + 1) * cw..][..cw], &mut odd[(i + 1) * cw..][..cw]);
            for (j, px) in line.chunks(2).enumerate() {
                o[j] = px[0];
                if let Some(&second) = px.get(1) {
                    e[j + 1] = second;
                }
            }
        }
        for ty in 0..th {
            // Bᵀ down the 4 rows of this tile row, for all columns at once: rows[4·parity + i].
            for (parity, plane) in [&even, &odd].into_iter().enumerate() {
                let d = &plane[2 * ty * cw..][..4 * cw];
                let (d0, d1, d2, d3) = (&d[..cw], &d[cw..2 * cw], &d[2 * cw..3 * cw], &d[3 * cw..]);
                let out = &mut rows[4 * parity * cw..][..4 * cw];
                let (r0, rest) = out.split_at_mut(cw);
                let (r1, rest) = rest.split_at_mut(cw);
                let (r2, r3) = rest.split_at_mut(cw);
                for j in 0..cw {
                    r0[j] = d0[j] - d2[j];
                    r1[j] = d1[j] + d2[j];
                    r2[j] = d2[j] - d1[j];
                    r3[j] = d1[j] - d3[j];
                }
            }
            // Then B along the columns of each tile; tiles of the row are contiguous in `t`.
            let t0 = (b * th + ty) * tw;
            for i in 0..4 {
                let (e, o) = (&rows[i * cw..][..cw], &rows[(4 + i) * cw..][..cw]);
                let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                let at = row_at + t0;
                let v0 = &mut v[4 * i][at..][..tw];
                for tx in 0..tw {
                    v0[tx] = e0[tx] - e1[tx];
                }
                let v1 = &mut v[4 * i + 1][at..][..tw];
                for tx in 0..tw {
                    v1[tx] = o0[tx] + e1[tx];
                }
                let v2 = &mut v[4 * i + 2][at..][..tw];
                for tx in 0..tw {
                    v2[tx] = e1[tx] - o0[tx];
                }
                let v3 = &mut v[4 * i + 3][at..][..tw];
                for tx in 0..tw {
                    v3[tx] = o0[tx] - o1[tx];
                }
            }
        }
    }
}

/// `Y = Aᵀ M A + bias` for every tile, from `m[ξ][k][t]` into `y[n][k][h][w]`.
///
/// Aᵀ = [[1,1,1,0],[0,1,-1,-1]]. Only the output planes `planes` (`b·k + ki`), into `y`.
fn output_transform(m: &[f32], bias: &[f32], [n, k, h, w]: [usize; 4], planes: std::ops::Range<usize>, y: &mut [f32]) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let t = n * th * tw;
    let mut s = vec![0f32; 8 * tw];
    let mut pair = vec![0f32; 2 * tw];
    for (out, plane) in y.chunks_exact_mut(h * w).zip(planes) {
        let (b, ki) = (plane / k, plane % k);
        let beta = bias[ki];
        for ty in 0..th {
            let t0 = (b * th + ty) * tw;
            let row = |xi: usize| &m[(xi * k + ki) * t + t0..][..tw];
            // Aᵀ down each column j of the tile: s[0][j] = m0j + m1j + m2j, s[1][j] = m1j − m2j − m3j.
            let (s0, s1) = s.split_at_mut(4 * tw);
            for j in 0..4 {
                let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
                let (a, b) = (&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]);
                for tx in 0..tw {
                    a[tx] = m0[tx] + m1[tx] + m2[tx];
                    b[tx] = m1[tx] - m2[tx] - m3[tx];
                }
            }
            // Then A along each row, giving 2 output rows of 2 pixels per tile.
            for i in 0..2 {
                let y_row = 2 * ty + i;
                if y_row >= h {
                    break;
                }
                let sr = &s[4 * i * tw..][..4 * tw];
                let (a0, a1, a2, a3) = (&sr[..tw], &sr[tw..2 * tw], &sr[2 * tw..3 * tw], &sr[3 * tw..]);
                for (tx, px) in pair.chunks_exact_mut(2).enumerate() {
                    px[0] = a0[tx] + a1[tx] + a2[tx] + beta;
                    px[1] = a1[tx] - a2[tx] - a3[tx] + beta;
                }
                out[y_row * w..][..w].copy_from_slice(&pair[..w]);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0).collect()
    }

    /// The 3×3, padding-1 convolution in f64, the reference.
    pub(crate) fn direct(x: &[f32], kernel: &[f32], bias: &[f32], dims: [usize; 4], k: usize) -> Vec<f64> {
        direct_window(x, kernel, bias, dims, k, Window::square(3, 1))
    }

    /// A float64 convolution of `x` `[n, c, h, w]` with OIHW `kernel` over any window.
    pub(crate) fn direct_window(
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
        [n, c, h, w]: [usize; 4],
        k: usize,
        g: Window,
    ) -> Vec<f64> {
        let [oh, ow] = g.output([h, w]).expect("the window fits");
        let s = g.size;
        let mut y = vec![0f64; n * k * oh * ow];
        for (b, ko, oy, ox) in tract_itertools::iproduct!(0..n, 0..k, 0..oh, 0..ow) {
            let mut acc = bias[ko] as f64;
            for (ci, dy, dx) in tract_itertools::iproduct!(0..c, 0..s, 0..s) {
                let yy = (oy * g.stride + dy) as isize - g.before[0] as isize;
                let xx = (ox * g.stride + dx) as isize - g.before[1] as isize;
                if (0..h as isize).contains(&yy) && (0..w as isize).contains(&xx) {
                    let v = x[((b * c + ci) * h + yy as usize) * w + xx as usize] as f64;
                    acc += v * kernel[((ko * c + ci) * s + dy) * s + dx] as f64;
                }
            }
            y[((b * k + ko) * oh + oy) * ow + ox] = acc;
        }
        y
    }

    fn op_for(kernel: &[f32], bias: &[f32], k: usize, c: usize) -> Winograd3x3 {
        Winograd3x3::new(kernel, Some(bias), k, c)
    }

    /// Both ways of running the products, where this CPU has both.
    fn ops_for(kernel: &[f32], bias: &[f32], k: usize, c: usize) -> Vec<Winograd3x3> {
        #[allow(unused_mut)] // only x86-64 adds the second
        let mut ops = vec![Winograd3x3::with_products(kernel, Some(bias), k, c, false)];
        #[cfg(target_arch = "x86_64")]
        if gemm::available() {
            ops.push(Winograd3x3::with_products(kernel, Some(bias), k, c, true));
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

    /// tract's 3×3, stride-1, padding-1 NCHW convolution from `c` to `k` channels (OIHW weights,
    /// bias as its third input): what `rewrite` looks for.
    fn conv3x3(c: usize, k: usize) -> tract_onnx::tract_core::ops::cnn::Conv {
        use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
        use tract_onnx::tract_core::ops::nn::DataFormat;
        let pool_spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            dilations: None,
            strides: None,
            input_channels: c,
            output_channels: k,
        };
        Conv { pool_spec, kernel_fmt: KernelFormat::OIHW, group: 1, q_params: None }
    }

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
        assert_eq!(rewrite(&mut ours)?, 1);
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
    #[cfg(target_arch = "x86_64")]
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
            assert_eq!(rewrite(&mut ours)?, 1);
            let pointwise = ours.nodes().iter().any(|n| n.op_is::<crate::pointwise::Pointwise>());
            assert_eq!(pointwise, direct, "{side}x{side} map");
            let got = ours.into_optimized()?.into_runnable()?.run(inputs)?;
            let (want, got) = (f32s(&want[0], "want")?, f32s(&got[0], "got")?);
            let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-4, "{side}x{side}: max abs difference {worst}");
        }
        Ok(())
    }

    #[test]
    fn odd_sizes_and_single_pixels() {
        check(1, 2, 3, 5, 7);
        check(3, 1, 1, 1, 1);
        check(1, 4, 2, 3, 2);
    }
}
