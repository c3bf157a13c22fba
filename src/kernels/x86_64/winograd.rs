//! The Winograd convolution on x86-64 with AVX2 and FMA (or AVX-512), one block of 16 tiles at
//! a time.
//!
//! Why blocks: the whole-map layout (`crate::kernels::portable::winograd`) writes the transformed input `V` of the whole image,
//! then the products `M` of the whole image, and reads both back: 16 values per 2×2 tile and
//! channel, 1 MB each for a 64-channel 32×32 map, so every stage streams through L3. Here a
//! block of [`NR`] tiles (the width of our kernel's block) is transformed for all input channels
//! (`c`·1 KB, in L1/L2), multiplied panel by panel of [`MR`] output channels (up to five panels
//! at once on AVX-512) into a buffer of 6–30 KB, and transformed back into the output at once. The
//! arithmetic is the plain layout's, in the same order: the results are the same bits.
//!
//! A block is the tiles `16q .. 16q + 16` in the order of `t` (batch, tile row, tile column); it
//! breaks into [`Run`]s of tiles that share a tile row. With AVX2 the runs are copied into
//! arrays of 16 lanes and transformed in two halves of 8. With AVX-512 a block is one register:
//! masked loads and two-table permutes gather each run's tile columns straight from the input
//! (zeros outside the image, no copies), and permutes and masked stores write the output rows
//! (8×8 maps, whose blocks hold 4 runs of 4 tiles, took a scalar path with AVX2).

use std::arch::x86_64::*;

use crate::kernels::gemm::{self, MR, NR};
use crate::kernels::Floats;

/// Rows of products kept per tile position: the most panels the AVX-512 kernel makes at once.
const ROWS: usize = gemm::MOST * MR;

/// Tiles of one tile row in a block: image `b`, tile row `ty`, columns `tx0 .. tx0 + len`, in
/// the block's lanes `lane .. lane + len`.
#[derive(Clone, Copy)]
struct Run {
    b: usize,
    ty: usize,
    tx0: usize,
    len: usize,
    lane: usize,
}

/// The runs of block `q` of `t` tiles, `th` × `tw` per image.
fn runs(q: usize, t: usize, [th, tw]: [usize; 2], out: &mut Vec<Run>) {
    out.clear();
    let (mut at, end) = (q * NR, t.min(q * NR + NR));
    while at < end {
        let (row, tx0) = (at / tw, at % tw);
        let len = (tw - tx0).min(end - at);
        out.push(Run { b: row / th, ty: row % th, tx0, len, lane: at - q * NR });
        at += len;
    }
}

/// Shapes of one call: batch, input channels, output channels, height, width.
#[derive(Clone, Copy)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
    /// Blocks that one item takes at once, reading each panel of the weights once for all of
    /// them (1: each block on its own).
    pub chunk: usize,
}

impl Dims {
    fn tiles(&self) -> [usize; 2] {
        [self.h.div_ceil(2), self.w.div_ceil(2)]
    }

    /// Blocks of [`NR`] tiles in a call.
    pub fn blocks(&self) -> usize {
        let [th, tw] = self.tiles();
        (self.n * th * tw).div_ceil(NR)
    }

    /// Items of [`Dims::chunk`] blocks (the last one may have fewer).
    pub fn chunks(&self) -> usize {
        self.blocks().div_ceil(self.chunk)
    }

    /// Panels of [`MR`] output channels.
    pub fn panels(&self) -> usize {
        self.k.div_ceil(MR)
    }

    /// Scratch one thread needs: for each block of a chunk, its `V` and its products for the
    /// most panels the kernel takes at once.
    pub fn scratch_len(&self) -> usize {
        self.chunk * self.block_scratch()
    }

    fn block_scratch(&self) -> usize {
        16 * self.c * NR + 16 * ROWS * NR
    }
}

/// The output, written by several threads at once: each writes only the pixels of its own
/// tiles, and tiles do not overlap.
#[derive(Clone, Copy)]
pub struct Output {
    ptr: *mut f32,
    len: usize,
}

// Safety: see the type's docs; `run` writes only inside `len` and only its own tiles.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    pub fn new(y: &mut [f32]) -> Self {
        Output { ptr: y.as_mut_ptr(), len: y.len() }
    }
}

/// One convolution call: what every thread that takes a share of its work reads. `u` from
/// `gemm::pack_weights`, 16 matrices of `gemm::packed_len(k, c)`; `bias` k values; `x`
/// `[n, c, h, w]`; `y` `[n, k, h, w]`. The work is [`Dims::chunks`] × `groups` items, item `i`
/// being the output-channel panels of group `i / chunks` for chunk `i % chunks`. Groups let
/// threads share a map of fewer blocks than threads (an 8×8 map is one block), and split the
/// weights of a large layer (each thread then reads only its own panels' for every block, and
/// transforms every block's input itself).
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub u: Floats<'a>,
    pub bias: &'a [f32],
    pub x: &'a [f32],
    pub y: Output,
    pub d: Dims,
    pub groups: usize,
}

/// Convolves `items` of `call`'s work into its `y`, with `scratch` of [`Dims::scratch_len`].
/// `kernel` is the one the products run on, and the transforms with it (AVX-512 or AVX2);
/// both give the same bits. Panics unless `kernel.runs_here()`.
pub fn run(kernel: gemm::Kernel, call: Call, items: std::ops::Range<usize>, scratch: &mut [f32]) {
    let Call { u, bias, x, y, d, groups } = call;
    assert!(kernel.runs_here(), "fused::run: this CPU cannot run {kernel:?}");
    assert!(x.len() >= d.n * d.c * d.h * d.w && y.len >= d.n * d.k * d.h * d.w, "fused::run: short tensor");
    assert!(u.len() >= 16 * gemm::packed_len(d.k, d.c) && bias.len() >= d.k, "fused::run: short weights");
    assert!(scratch.len() >= d.scratch_len(), "fused::run: short scratch");
    assert!(groups >= 1 && d.chunk >= 1 && items.end <= d.chunks() * groups, "fused::run: no such item");
    // Safety: the kernel's instructions checked, lengths asserted.
    unsafe {
        match kernel {
            gemm::Kernel::Avx2 => run_avx2(call, items, scratch),
            gemm::Kernel::Avx512 => run_avx512(call, items, scratch),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(call: Call, items: std::ops::Range<usize>, scratch: &mut [f32]) {
    // Safety: the caller's.
    unsafe { body::<false>(call, items, scratch) }
}

/// The same work with the transforms on 16 lanes: the whole block in one register.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512(call: Call, items: std::ops::Range<usize>, scratch: &mut [f32]) {
    // Safety: the caller's.
    unsafe { body::<true>(call, items, scratch) }
}

/// `run`'s work, inlined into a function built for the instructions `WIDE` uses (AVX-512 when
/// set, else AVX2 and FMA).
#[inline(always)]
unsafe fn body<const WIDE: bool>(call: Call, items: std::ops::Range<usize>, scratch: &mut [f32]) {
    let Call { u, bias, x, y, d, groups } = call;
    let Dims { n, c, k, h, w, .. } = d;
    let [th, tw] = d.tiles();
    let t = n * th * tw;
    let mut parts: Vec<(&mut [f32], &mut [f32])> =
        scratch.chunks_exact_mut(d.block_scratch()).take(d.chunk).map(|b| b.split_at_mut(16 * c * NR)).collect();
    let len = gemm::packed_len(k, c);
    let panels = k.div_ceil(MR);
    let kernel = if WIDE { gemm::Kernel::Avx512 } else { gemm::Kernel::Avx2 };
    let mut lists: Vec<Vec<Run>> = (0..d.chunk).map(|_| Vec::with_capacity(NR)).collect();
    let mut lanes: Vec<Vec<Lanes>> = (0..d.chunk).map(|_| Vec::with_capacity(NR)).collect();
    let mut pad = Vec::new();
    let mut dt = [[[0f32; NR]; 4]; 4];
    let mut px = [[[0f32; NR]; 2]; 2];
    let mut transformed = None;
    // Float16 weights: the panels one product takes, widened.
    let mut wide = Vec::new();
    for item in items {
        let (g, q) = (item / d.chunks(), item % d.chunks());
        let blocks = q * d.chunk..d.blocks().min((q + 1) * d.chunk);
        let held = blocks.len();
        if transformed != Some(q) {
            for (b, block) in blocks.clone().enumerate() {
                let (list, lanes) = (&mut lists[b], &mut lanes[b]);
                runs(block, t, [th, tw], list);
                if WIDE {
                    lanes.clear();
                    // Safety: AVX-512 (WIDE).
                    lanes.extend(list.iter().map(|run| unsafe { Lanes::new(run, w) }));
                } else if pad.len() < list.len() * 4 * (w + 20) {
                    pad.resize(list.len() * 4 * (w + 20), 0.0);
                }
                for ci in 0..c {
                    // Safety: AVX2 (and AVX-512 if WIDE); `pad` as `input_block` needs it.
                    unsafe { input_block::<WIDE>(x, [c, h, w], ci, list, lanes, parts[b].0, &mut dt, &mut pad) };
                }
            }
            transformed = Some(q);
        }
        let (mut p, end) = (g * panels / groups, (g + 1) * panels / groups);
        while p < end {
            let count = gemm::at_once(kernel, end - p);
            for xi in 0..16 {
                let first = xi * len + p * c * MR;
                let up = u.widen(first..first + count * c * MR, &mut wide);
                for (v, m) in parts.iter_mut().take(held) {
                    let rows = &v[xi * c * NR..][..c * NR];
                    let out = &mut m[xi * ROWS * NR..][..ROWS * NR];
                    // Safety: `kernel` is the one `run` checked; `up` holds the panels from p
                    // (so the rows below k − p·MR), `rows` c rows of NR, `out` ROWS ≥ count·MR
                    // rows of NR.
                    unsafe { gemm::block(kernel, up, [k - p * MR, c], 0..count, rows, NR, out.as_mut_ptr(), NR, None) };
                }
            }
            for (b, (_, m)) in parts.iter().enumerate().take(held) {
                for r in 0..(count * MR).min(k - p * MR) {
                    // Safety: AVX2 (and AVX-512 if WIDE).
                    unsafe {
                        output_block::<WIDE>(m, r, bias[p * MR + r], d, p * MR + r, &lists[b], &lanes[b], y, &mut px)
                    };
                }
            }
            p += count;
        }
    }
}

/// The even- and odd-indexed elements of 16 consecutive floats at `p`, as two vectors of 8.
///
/// Safety: AVX2; 16 floats readable at `p`.
#[inline(always)]
unsafe fn deinterleave(p: *const f32) -> (__m256, __m256) {
    unsafe {
        let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
        // Within each 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6]; then the 64-bit pairs in order.
        let even = _mm256_shuffle_ps::<0x88>(a, b);
        let odd = _mm256_shuffle_ps::<0xDD>(a, b);
        let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
        (order(even), order(odd))
    }
}

/// Element (i, j) of every lane's 4×4 input tile, `[i][j][lane]`.
type Tiles = [[[f32; NR]; 4]; 4];

/// `V = Bᵀ d B` for the tiles of `list`, channel `ci`, into `v[ξ][ci][lane]`. Bᵀ =
/// [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. `dt` is scratch; lanes that no run covers
/// keep what they held, harmless: every lane of the products depends on its own lane only.
/// `pad` holds 4 rows of w + 20 floats per run, zero where this function does not write.
///
/// With `WIDE` (AVX-512), `lanes` (from [`Lanes::new`] for each run of `list`) gathers the tiles
/// straight from `x` into registers; `dt` and `pad` are then not used.
///
/// Safety: AVX2, and AVX-512 if `WIDE`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn input_block<const WIDE: bool>(
    x: &[f32],
    [c, h, w]: [usize; 3],
    ci: usize,
    list: &[Run],
    lanes: &[Lanes],
    v: &mut [f32],
    dt: &mut Tiles,
    pad: &mut [f32],
) {
    if WIDE {
        assert!(ci < c && v.len() >= 16 * c * NR, "input_block: no room for channel {ci}");
        // Safety: AVX-512; `v` asserted, `x` holds [n, c, h, w] (checked by `run`).
        unsafe { input_wide(x, [c, h, w], ci, list, lanes, v.as_mut_ptr()) };
        return;
    }
    let stride = w + 20;
    // First every row the block needs, with a zero before it and zeros after: column j of tile
    // tx, input column 2tx + j − 1, is then pad[2tx + j]. All the copies go first: vector loads
    // right behind the copy of their row stalled (store forwarding across unaligned stores).
    for (run, rows) in list.iter().zip(pad.chunks_exact_mut(4 * stride)) {
        let plane = &x[(run.b * c + ci) * h * w..][..h * w];
        for (i, row) in rows.chunks_exact_mut(stride).enumerate() {
            // Tile row ty covers input rows 2ty − 1 .. 2ty + 3.
            if let Some(r) = (2 * run.ty + i).checked_sub(1).filter(|&r| r < h) {
                row[1..=w].copy_from_slice(&plane[r * w..][..w]);
            }
        }
    }
    for (run, rows) in list.iter().zip(pad.chunks_exact(4 * stride)) {
        let (len, lane) = (run.len, run.lane);
        for (i, (di, row)) in dt.iter_mut().zip(rows.chunks_exact(stride)).enumerate() {
            if (2 * run.ty + i).checked_sub(1).filter(|&r| r < h).is_none() {
                for dij in di.iter_mut() {
                    dij[lane..lane + len].fill(0.0);
                }
                continue;
            }
            for g in (0..len).step_by(8) {
                let (base, at) = (2 * (run.tx0 + g), lane + g);
                if len - g >= 8 {
                    // Safety: base + 19 ≤ 2·tw + 3 ≤ w + 4 < stride floats of `row`; 8 lanes
                    // from `at`.
                    unsafe {
                        let p = row.as_ptr().add(base);
                        let (d0, _) = deinterleave(p);
                        let (d1, d2) = deinterleave(p.add(1));
                        let (d3, _) = deinterleave(p.add(3));
                        _mm256_storeu_ps(di[0][at..at + 8].as_mut_ptr(), d0);
                        _mm256_storeu_ps(di[1][at..at + 8].as_mut_ptr(), d1);
                        _mm256_storeu_ps(di[2][at..at + 8].as_mut_ptr(), d2);
                        _mm256_storeu_ps(di[3][at..at + 8].as_mut_ptr(), d3);
                    }
                } else {
                    for l in 0..len - g {
                        for j in 0..4 {
                            di[j][at + l] = row[base + 2 * l + j];
                        }
                    }
                }
            }
        }
    }
    // Bᵀ down the rows, then B along the columns: the plain layout's order, the same bits.
    // Written out register by register: `std::array::from_fn` and `<[T; N]>::map` here were
    // compiled out of line, without AVX, and their results read back through the stack (a
    // store-forwarding stall on every tile).
    assert!(ci < c && v.len() >= 16 * c * NR, "input_block: no room for channel {ci}");
    let vp = v.as_mut_ptr();
    for half in [0, 8] {
        // Safety: AVX2; 8 lanes from `half` of 16 in `dt`, and v[(ξ·c + ci)·NR + half ..][..8]
        // inside `v` (asserted above).
        unsafe {
            let d = |i: usize, j: usize| _mm256_loadu_ps(dt[i][j].as_ptr().add(half));
            let mut col = [[_mm256_setzero_ps(); 4]; 4];
            for (j, cj) in col.iter_mut().enumerate() {
                let (d0, d1, d2, d3) = (d(0, j), d(1, j), d(2, j), d(3, j));
                *cj = [_mm256_sub_ps(d0, d2), _mm256_add_ps(d1, d2), _mm256_sub_ps(d2, d1), _mm256_sub_ps(d1, d3)];
            }
            // `i` picks row i of each column: the index is the clearest way to say it.
            #[allow(clippy::needless_range_loop)]
            for i in 0..4 {
                let (a0, a1, a2, a3) = (col[0][i], col[1][i], col[2][i], col[3][i]);
                let store = |j: usize, o: __m256| _mm256_storeu_ps(vp.add(((4 * i + j) * c + ci) * NR + half), o);
                store(0, _mm256_sub_ps(a0, a2));
                store(1, _mm256_add_ps(a1, a2));
                store(2, _mm256_sub_ps(a2, a1));
                store(3, _mm256_sub_ps(a1, a3));
            }
        }
    }
}

/// `Y = Aᵀ M A + bias` for output channel `ko` from row `r` of the panels' products `m[ξ][r]`,
/// into the pixels of the tiles of `list`, through `px`. Aᵀ = [[1,1,1,0],[0,1,-1,-1]].
///
/// With `WIDE` (AVX-512), straight from registers into `y` through `lanes`; `px` is then not
/// used.
///
/// Safety: AVX2, and AVX-512 if `WIDE`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn output_block<const WIDE: bool>(
    m: &[f32],
    r: usize,
    beta: f32,
    d: Dims,
    ko: usize,
    list: &[Run],
    lanes: &[Lanes],
    y: Output,
    px: &mut [[[f32; NR]; 2]; 2],
) {
    if WIDE {
        assert!(r < ROWS && m.len() >= 16 * ROWS * NR, "output_block: no row {r}");
        // Safety: AVX-512; `m` asserted; `y` holds [n, k, h, w] (checked by `run`).
        unsafe { output_wide(m.as_ptr(), r, beta, d, ko, list, lanes, y) };
        return;
    }
    let Dims { k, h, w, .. } = d;
    // px[i][j]: output pixel (i, j) of every lane's tile, all of it written below. Written out
    // without `from_fn` and `map`, for the reason `input_block` gives.
    assert!(r < ROWS && m.len() >= 16 * ROWS * NR, "output_block: no row {r}");
    let mp = m.as_ptr();
    for half in [0, 8] {
        // Safety: AVX2; 8 lanes from `half` of each 16-lane row of `m` (asserted above).
        unsafe {
            let row = |xi: usize| _mm256_loadu_ps(mp.add((xi * ROWS + r) * NR + half));
            let mut col = [[_mm256_setzero_ps(); 2]; 4];
            for (j, cj) in col.iter_mut().enumerate() {
                let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
                *cj = [_mm256_add_ps(_mm256_add_ps(m0, m1), m2), _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3)];
            }
            let b = _mm256_set1_ps(beta);
            for (i, pi) in px.iter_mut().enumerate() {
                let (a0, a1, a2, a3) = (col[0][i], col[1][i], col[2][i], col[3][i]);
                let p0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), a2), b);
                let p1 = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(a1, a2), a3), b);
                _mm256_storeu_ps(pi[0].as_mut_ptr().add(half), p0);
                _mm256_storeu_ps(pi[1].as_mut_ptr().add(half), p1);
            }
        }
    }
    for run in list {
        for (i, pi) in px.iter().enumerate() {
            let yr = 2 * run.ty + i;
            if yr >= h {
                break;
            }
            // The run's tiles cover columns 2tx0 .. 2(tx0 + len) of this row, the last one
            // cut off when w is odd.
            let first = ((run.b * k + ko) * h + yr) * w + 2 * run.tx0;
            let width = (2 * run.len).min(w - 2 * run.tx0);
            debug_assert!(first + width <= y.len);
            // Safety: inside `y` (`run` checked its length; yr < h, the columns < w); these
            // pixels belong to this run's tiles, which no other block or thread writes.
            let out = unsafe { std::slice::from_raw_parts_mut(y.ptr.add(first), width) };
            let (a, b) = (&pi[0][run.lane..][..run.len], &pi[1][run.lane..][..run.len]);
            let mut l = 0;
            while 2 * l + 16 <= width {
                // Safety: AVX2; 8 lanes of a and b, 16 pixels of `out`.
                unsafe {
                    let (a, b) = (_mm256_loadu_ps(a[l..][..8].as_ptr()), _mm256_loadu_ps(b[l..][..8].as_ptr()));
                    // [a0 b0 a1 b1 | a4 b4 a5 b5] and [a2 b2 a3 b3 | a6 b6 a7 b7], then halves in order.
                    let (lo, hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
                    let o = out[2 * l..][..16].as_mut_ptr();
                    _mm256_storeu_ps(o, _mm256_permute2f128_ps::<0x20>(lo, hi));
                    _mm256_storeu_ps(o.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
                }
                l += 8;
            }
            while 2 * l < width {
                out[2 * l] = a[l];
                if 2 * l + 1 < width {
                    out[2 * l + 1] = b[l];
                }
                l += 1;
            }
        }
    }
}

/// Where one run's tiles sit in a block and in its rows, for the AVX-512 gathers and scatters.
struct Lanes {
    /// Input column of the run's first tile's first column (−1 at the left edge).
    col0: isize,
    /// Which lanes of the loads at `col0`, `col0 + 16`, `col0 + 2`, `col0 + 18` are columns of
    /// the image (the others load zeros: the padding).
    load: [u16; 4],
    /// Lanes of the block that are this run's.
    mine: u16,
    /// For each lane of the run, the position in a pair of loads of its tile's even and odd
    /// column.
    even: __m512i,
    odd: __m512i,
    /// Which lanes of the products make output pixels 0..16 and 16..32 of the run's row, and how
    /// many of those pixels the row has.
    pixels: [__m512i; 2],
    stores: [u16; 2],
}

impl Lanes {
    /// Safety: AVX-512.
    #[inline(always)]
    unsafe fn new(run: &Run, w: usize) -> Lanes {
        let col0 = 2 * run.tx0 as isize - 1;
        let valid = |from: isize| -> u16 {
            (0..16).filter(|l| (0..w as isize).contains(&(from + l))).fold(0, |m, l| m | 1 << l)
        };
        let load = [valid(col0), valid(col0 + 16), valid(col0 + 2), valid(col0 + 18)];
        let lane = |l: usize| l.checked_sub(run.lane).filter(|&i| i < run.len);
        let index = |odd: i32| -> [i32; 16] { std::array::from_fn(|l| lane(l).map_or(0, |i| 2 * i as i32 + odd)) };
        // Output pixel e of the row: column (e / 2) of the tile at lane `run.lane + e / 2`, from
        // the even-column products (table 0) or the odd-column ones (table 1, index + 16).
        let pixel = |e: usize| -> i32 { (run.lane + (e / 2).min(NR - 1 - run.lane)) as i32 + 16 * (e % 2) as i32 };
        let width = (2 * run.len).min(w - 2 * run.tx0);
        let store = |from: usize| -> u16 { (0..16).filter(|e| from + e < width).fold(0, |m, e| m | 1 << e) };
        let vector = |v: [i32; 16]| unsafe { _mm512_loadu_si512(v.as_ptr().cast()) };
        Lanes {
            col0,
            load,
            mine: (0..16).filter(|&l| lane(l).is_some()).fold(0, |m, l| m | 1 << l),
            even: vector(index(0)),
            odd: vector(index(1)),
            pixels: [vector(std::array::from_fn(pixel)), vector(std::array::from_fn(|e| pixel(e + 16)))],
            stores: [store(0), store(16)],
        }
    }
}

/// `input_block` on AVX-512: row i of every lane's tile is gathered from `x` by masked loads and
/// two-table permutes (zeros outside the image), then the same sums as `input_block`'s.
///
/// Safety: AVX-512; `x` holds the tiles' planes and `v` 16·c·NR floats.
#[inline(always)]
unsafe fn input_wide(x: &[f32], [c, h, w]: [usize; 3], ci: usize, list: &[Run], lanes: &[Lanes], vp: *mut f32) {
    unsafe {
        let mut d = [[_mm512_setzero_ps(); 4]; 4];
        for (run, at) in list.iter().zip(lanes) {
            let plane = x.as_ptr().add((run.b * c + ci) * h * w);
            for (i, di) in d.iter_mut().enumerate() {
                // Tile row ty covers input rows 2ty − 1 .. 2ty + 3; rows outside stay zero.
                let Some(r) = (2 * run.ty + i).checked_sub(1).filter(|&r| r < h) else { continue };
                // Masked-off lanes are not read, so the address may point outside the row.
                let p = plane.add(r * w).wrapping_offset(at.col0);
                let ld = |k: usize, off: usize| _mm512_maskz_loadu_ps(at.load[k], p.wrapping_add(off));
                let (a, b, a2, b2) = (ld(0, 0), ld(1, 16), ld(2, 2), ld(3, 18));
                let put = |into: __m512, idx: __m512i, lo: __m512, hi: __m512| {
                    _mm512_mask_mov_ps(into, at.mine, _mm512_permutex2var_ps(lo, idx, hi))
                };
                // Columns 0 and 1 of a tile are the even and odd columns from col0; 2 and 3
                // those from col0 + 2.
                di[0] = put(di[0], at.even, a, b);
                di[1] = put(di[1], at.odd, a, b);
                di[2] = put(di[2], at.even, a2, b2);
                di[3] = put(di[3], at.odd, a2, b2);
            }
        }
        // Bᵀ down the rows, then B along the columns, as in `input_block`.
        let mut col = [[_mm512_setzero_ps(); 4]; 4];
        for (j, cj) in col.iter_mut().enumerate() {
            let (d0, d1, d2, d3) = (d[0][j], d[1][j], d[2][j], d[3][j]);
            *cj = [_mm512_sub_ps(d0, d2), _mm512_add_ps(d1, d2), _mm512_sub_ps(d2, d1), _mm512_sub_ps(d1, d3)];
        }
        #[allow(clippy::needless_range_loop)]
        for i in 0..4 {
            let (a0, a1, a2, a3) = (col[0][i], col[1][i], col[2][i], col[3][i]);
            let store = |j: usize, o: __m512| _mm512_storeu_ps(vp.add(((4 * i + j) * c + ci) * NR), o);
            store(0, _mm512_sub_ps(a0, a2));
            store(1, _mm512_add_ps(a1, a2));
            store(2, _mm512_sub_ps(a2, a1));
            store(3, _mm512_sub_ps(a1, a3));
        }
    }
}

/// `output_block` on AVX-512: the same sums, then each run's two rows of pixels interleaved
/// from the even- and odd-column products by permutes and written by masked stores.
///
/// Safety: AVX-512; `m` holds 16·ROWS·NR floats, `y` the output tensor.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn output_wide(
    mp: *const f32,
    r: usize,
    beta: f32,
    d: Dims,
    ko: usize,
    list: &[Run],
    lanes: &[Lanes],
    y: Output,
) {
    let Dims { k, h, w, .. } = d;
    unsafe {
        let row = |xi: usize| _mm512_loadu_ps(mp.add((xi * ROWS + r) * NR));
        let mut col = [[_mm512_setzero_ps(); 2]; 4];
        for (j, cj) in col.iter_mut().enumerate() {
            let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
            *cj = [_mm512_add_ps(_mm512_add_ps(m0, m1), m2), _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3)];
        }
        let b = _mm512_set1_ps(beta);
        #[allow(clippy::needless_range_loop)]
        for i in 0..2 {
            let (a0, a1, a2, a3) = (col[0][i], col[1][i], col[2][i], col[3][i]);
            let p0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), a2), b);
            let p1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(a1, a2), a3), b);
            for (run, at) in list.iter().zip(lanes) {
                let yr = 2 * run.ty + i;
                if yr >= h {
                    continue;
                }
                let first = ((run.b * k + ko) * h + yr) * w + 2 * run.tx0;
                debug_assert!(first + (2 * run.len).min(w - 2 * run.tx0) <= y.len);
                // Safety: the masks keep the stores to the run's own pixels of row yr, inside `y`.
                for half in 0..2 {
                    if at.stores[half] != 0 {
                        let o = _mm512_permutex2var_ps(p0, at.pixels[half], p1);
                        _mm512_mask_storeu_ps(y.ptr.add(first + 16 * half), at.stores[half], o);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::portable::winograd::transform_kernel;
    use crate::kernels::testing::random;

    /// The AVX-512 gathers, permutes and masked stores against the AVX2 path (itself checked
    /// against a direct convolution in `crate::ops::winograd3x3`): maps whose blocks hold 1 to 16 runs, runs that
    /// start at the left edge or end at the right one, odd widths, blocks spanning images.
    #[test]
    fn avx512_and_avx2_give_the_same_bits() {
        if !gemm::Kernel::Avx512.runs_here() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let shapes = [
            (1, 3, 5, 8, 8),
            (2, 4, 3, 6, 10),
            (1, 13, 19, 14, 18),
            (2, 5, 7, 6, 40),
            (3, 3, 4, 9, 9),
            (1, 2, 3, 1, 1),
            (2, 4, 4, 1, 5),
            (1, 7, 13, 32, 32),
            (2, 6, 12, 16, 16),
            (1, 5, 8, 64, 64),
            (1, 3, 2, 33, 35),
        ];
        for (n, c, k, h, w) in shapes {
            let d = Dims { n, c, k, h, w, chunk: 1 };
            let chunked = Dims { chunk: 3, ..d };
            let u: Vec<f32> = transform_kernel(&random(k * c * 9, 1), k, c)
                .chunks_exact(k * c)
                .flat_map(|ui| gemm::pack_weights(ui, k, c))
                .collect();
            let (x, bias) = (random(n * c * h * w, 2), random(k, 3));
            for groups in [1, 2.min(d.panels())] {
                let ys = [gemm::Kernel::Avx2, gemm::Kernel::Avx512].map(|kernel| {
                    let mut y = vec![f32::NAN; n * k * h * w];
                    let mut scratch = vec![0f32; d.scratch_len()];
                    let items = 0..d.chunks() * groups;
                    let call = Call { u: Floats::F32(&u), bias: &bias, x: &x, y: Output::new(&mut y), d, groups };
                    run(kernel, call, items, &mut scratch);
                    y
                });
                let same = ys[0].iter().zip(&ys[1]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "n{n} c{c} k{k} {h}x{w}, {groups} group(s)");
                // Chunks of 3 blocks (the last one shorter), on both kernels.
                for (kernel, want) in [gemm::Kernel::Avx2, gemm::Kernel::Avx512].into_iter().zip(&ys) {
                    let mut y = vec![f32::NAN; n * k * h * w];
                    let mut scratch = vec![0f32; chunked.scratch_len()];
                    let items = 0..chunked.chunks() * groups;
                    let call =
                        Call { u: Floats::F32(&u), bias: &bias, x: &x, y: Output::new(&mut y), d: chunked, groups };
                    run(kernel, call, items, &mut scratch);
                    let same = y.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kernel:?}, chunks of 3: n{n} c{c} k{k} {h}x{w}, {groups} group(s)");
                }
                assert!(ys[1].iter().all(|v| v.is_finite()), "a pixel left unwritten: n{n} c{c} k{k} {h}x{w}");
            }
        }
    }
}
