//! The products of linear layers on x86-64: `Y = X · W + b` with `X` (t rows × c features, the
//! activations), `W` (c × k, constant) and `Y` (t × k). Transformers are mostly these, with t in
//! the hundreds or thousands of tokens and c, k in the hundreds.
//!
//! Why not `crate::kernels::gemm`: that kernel broadcasts each weight and loads 16
//! columns of the other operand per multiply-add row, so it issues about one load per
//! multiply-add. Loads, not multiplies, then bound it (about half the machine's peak here). This
//! kernel turns the product around, as the fast BLAS kernels do: it broadcasts one activation per
//! row of the block and loads whole vectors of weights, packed at load time into panels of
//! [`Kernel::width`] output features. With AVX-512 a 12 × 32 block of `Y` lives in 24 registers
//! and each input feature costs 2 vector loads and 12 broadcasts for 24 multiply-adds.
//!
//! The activations of a block are packed per call (c × rows, [`pack_rows`]) so that the kernel
//! reads one stream whatever the input's strides. Sums run over the input features in order, one
//! fused multiply-add each, from the bias, so both kernels give the same bits.

use crate::kernels::gemm::Kernel;

impl Kernel {
    /// Output features per panel of packed weights.
    pub(crate) const fn width(self) -> usize {
        match self {
            Kernel::Avx2 => 16,
            Kernel::Avx512 => 32,
        }
    }

    /// The block heights (rows of `X`) the kernel has: as many rows as leave registers for
    /// the weights, down to half that.
    pub(crate) const fn heights(self) -> std::ops::RangeInclusive<usize> {
        match self {
            Kernel::Avx2 => 4..=6,
            Kernel::Avx512 => 8..=14,
        }
    }

    /// The block height for `t` rows: the fewest rows computed in all (padding the last block
    /// wastes its multiply-adds; a block also costs about a row more for its bias and stores),
    /// the tallest of equals. CLIP's 77 tokens take 6 blocks of 13 instead of 7 of 12.
    pub(crate) fn height_for(self, t: usize) -> usize {
        self.heights().rev().min_by_key(|&h| t.div_ceil(h) * (h + 1)).expect("a kernel has heights")
    }
}

/// Most rows per block of any kernel (the size of a caller's tile).
pub(crate) const MOST_ROWS: usize = 14;
/// Most features per panel of any kernel.
pub(crate) const MOST_WIDTH: usize = 32;

/// Length of [`pack_weights`]' output.
pub(crate) fn packed_len(kernel: Kernel, k: usize, c: usize) -> usize {
    k.div_ceil(kernel.width()) * c * kernel.width()
}

/// `W` in panels of `kernel.width()` output features, zero-padded, each as `c` rows of that many
/// values; the weight of output feature f for input feature i is at `w[f · strides[0] + i ·
/// strides[1]]`.
pub(crate) fn pack_weights(kernel: Kernel, w: &[f32], [k, c]: [usize; 2], strides: [usize; 2]) -> Vec<f32> {
    let width = kernel.width();
    let mut packed = vec![0f32; packed_len(kernel, k, c)];
    for f in 0..k {
        let panel = &mut packed[(f / width) * c * width..][..c * width];
        for i in 0..c {
            panel[i * width + f % width] = w[f * strides[0] + i * strides[1]];
        }
    }
    packed
}

/// The rows `rows` of `X` as `c` groups of `height` values (zero past the last row): feature i
/// of row r is at `x[offset(r) + features[i]]`.
pub(crate) fn pack_rows(
    height: usize,
    x: &[f32],
    rows: std::ops::Range<usize>,
    offset: impl Fn(usize) -> usize,
    features: &[usize],
    packed: &mut [f32],
) {
    debug_assert!(packed.len() == features.len() * height && rows.len() <= height && height <= MOST_ROWS);
    let mut at = [0usize; MOST_ROWS];
    let count = rows.len();
    for (a, r) in at.iter_mut().zip(rows) {
        *a = offset(r);
    }
    // Features side by side in each row (a token-major input): a tile of TILE features of
    // every row at a time, read as `count` short streams with no index per value, written to a
    // few cache lines that stay in L1 until the tile is done.
    if let Some(&first) = features.first().filter(|_| features.windows(2).all(|w| w[1] == w[0] + 1)) {
        let c = features.len();
        // With AVX-512, a tile of 16 features of every row is loaded as 16 vectors and
        // transposed in registers: the loop below stores one value at a time (on transformers'
        // linear layers it took about a tenth of their time), and a gather per feature, which
        // replaced it, costs a load per value on AMD's cores. Each row's line is read once,
        // so rows a multiple of 4 KiB apart (a ViT-H's tokens), whose lines share one set of
        // the L1 cache, are read no worse than any others.
        let fits = count > 0 && at[..count].iter().all(|&a| a + first + c <= x.len());
        if fits && Kernel::Avx512.runs_here() {
            // Safety: AVX-512F (`runs_here`); row r's features are x[at[r] + first + i] for
            // i < c, inside `x` (checked above); the groups are `packed`'s c · height values.
            unsafe { transpose_rows(height, &x[first..], &at[..count], c, packed) };
            return;
        }
        const TILE: usize = 16;
        for (i0, tile) in (0..c).step_by(TILE).zip(packed.chunks_mut(TILE * height)) {
            let n = TILE.min(c - i0);
            for (r, &a) in at[..count].iter().enumerate() {
                for (group, &v) in tile.chunks_exact_mut(height).zip(&x[a + first + i0..][..n]) {
                    group[r] = v;
                }
            }
            if count < height {
                tile.chunks_exact_mut(height).for_each(|group| group[count..].fill(0.0));
            }
        }
        return;
    }
    // Rows side by side (a channels-first input, or the values of an attention head): each
    // group is one short copy.
    if count > 0 && at[..count].windows(2).all(|w| w[1] == w[0] + 1) {
        for (group, &feature) in packed.chunks_exact_mut(height).zip(features) {
            group[..count].copy_from_slice(&x[at[0] + feature..][..count]);
            group[count..].fill(0.0);
        }
        return;
    }
    for (group, &feature) in packed.chunks_exact_mut(height).zip(features) {
        for (v, &a) in group.iter_mut().zip(&at[..count]) {
            *v = x[a + feature];
        }
        group[count..].fill(0.0);
    }
}

/// `packed`'s `c` groups of `height` values (zero past the rows) from the rows of `x` at
/// `at`, each with its `c` features side by side: 16 features of every row at a time, loaded
/// as one vector per row and transposed in registers, so that vector j holds feature j of
/// every row.
///
/// Safety: AVX-512F; `x[a + i]` inside `x` for every `a` in `at` and i < c; `at.len() <=
/// height <= 16`; `packed.len() == c · height`.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_rows(height: usize, x: &[f32], at: &[usize], c: usize, packed: &mut [f32]) {
    use std::arch::x86_64::*;
    let group: __mmask16 = ((1u32 << height) - 1) as u16;
    let len = packed.len();
    let (x, out) = (x.as_ptr(), packed.as_mut_ptr());
    for i0 in (0..c).step_by(16) {
        let n = 16.min(c - i0);
        let features: __mmask16 = ((1u32 << n) - 1) as u16;
        let mut rows = [_mm512_setzero_ps(); 16];
        for (v, &a) in rows.iter_mut().zip(at) {
            // Safety: the caller's bounds; lanes past the c features are masked (no fault).
            *v = unsafe { _mm512_maskz_loadu_ps(features, x.add(a + i0)) };
        }
        let columns = transpose16(rows);
        for (j, column) in columns.iter().take(n).enumerate() {
            let to = (i0 + j) * height;
            // A whole vector where it fits: its lanes past the group are the next group's
            // (zero rows here) and are written again with it.
            // Safety: `to + height <= len`, and a whole vector only where it fits.
            unsafe {
                if to + 16 <= len {
                    _mm512_storeu_ps(out.add(to), *column);
                } else {
                    _mm512_mask_storeu_ps(out.add(to), group, *column);
                }
            }
        }
    }
}

/// The 16 × 16 transpose of `r` (vector i is row i): in three rounds of shuffles, pairs of
/// values, then pairs of pairs inside each 128-bit lane, then the lanes across vectors.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Plain loops, no closures: a closure here would not get the function's target feature.
    // a[2k], a[2k + 1]: rows 2k and 2k + 1 interleaved, columns 4L, 4L + 1 and 4L + 2, 4L + 3
    // of each lane L.
    let mut a = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    // b[4k + m]: in lane L, column 4L + m of rows 4k..4k + 4.
    let mut b = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        for h in 0..2 {
            let (p, q) = (_mm512_castps_pd(a[4 * k + h]), _mm512_castps_pd(a[4 * k + 2 + h]));
            b[4 * k + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(p, q));
            b[4 * k + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(p, q));
        }
    }
    // Column 4L + m: lane L of b[m], b[4 + m], b[8 + m], b[12 + m].
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let low = _mm512_shuffle_f32x4::<0x44>(b[m], b[4 + m]);
        let high = _mm512_shuffle_f32x4::<0xEE>(b[m], b[4 + m]);
        let low2 = _mm512_shuffle_f32x4::<0x44>(b[8 + m], b[12 + m]);
        let high2 = _mm512_shuffle_f32x4::<0xEE>(b[8 + m], b[12 + m]);
        out[m] = _mm512_shuffle_f32x4::<0x88>(low, low2);
        out[4 + m] = _mm512_shuffle_f32x4::<0xDD>(low, low2);
        out[8 + m] = _mm512_shuffle_f32x4::<0x88>(high, high2);
        out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(high, high2);
    }
    out
}

/// Where a block's sums start.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start<'a> {
    /// From a bias: the same `kernel.width()` values for every row.
    Bias(&'a [f32]),
    /// From the output itself, so that a product over many features can run a slice of them at
    /// a time with the same sums.
    Out,
    /// From `height` rows `ld` apart elsewhere: the earlier slices' sums, when this slice's go
    /// straight to the output.
    Rows(*const f32, usize),
}

/// One block: `out[r · ld + f] = s[r][f] + Σ_i rows[i][r] · panel[i][f]` for the block's
/// `height` rows r and the panel's features f, over `c = rows.len() / height` input features,
/// where the sums `s` start as `start` says: all `height` rows of `kernel.width()` values are
/// stored.
///
/// `ahead` is part of what a later block will read (the next slice of weights): its cache lines
/// are requested during this block's loop, `kernel.width()` values per input feature, so that
/// they come from memory while this block computes rather than when that block stalls on them.
///
/// Safety: `kernel.runs_here()`, `height` one of `kernel.heights()`; `panel` holds c · width
/// values, a bias width, `Start::Rows` height rows of width values, and `out` height rows of
/// width values `ld` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block(
    kernel: Kernel,
    height: usize,
    rows: &[f32],
    panel: &[f32],
    start: Start,
    ahead: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let c = rows.len() / height;
    debug_assert!(panel.len() >= c * kernel.width());
    debug_assert!(kernel.heights().contains(&height));
    let (x, w) = (rows.as_ptr(), panel.as_ptr());
    let from = match start {
        Start::Bias(b) => {
            debug_assert!(b.len() >= kernel.width());
            SumsFrom { at: b.as_ptr(), step: 0 }
        }
        Start::Out => SumsFrom { at: out.cast_const(), step: ld },
        Start::Rows(at, step) => SumsFrom { at, step },
    };
    let ahead = Ahead { at: ahead.as_ptr(), features: (ahead.len() / kernel.width()).min(c) };
    // Safety: the caller's.
    unsafe {
        match (kernel, height) {
            (Kernel::Avx2, 4) => block_avx2::<4>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx2, 5) => block_avx2::<5>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx2, _) => block_avx2::<6>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, 8) => block_avx512::<8>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, 9) => block_avx512::<9>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, 10) => block_avx512::<10>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, 11) => block_avx512::<11>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, 12) => block_avx512::<12>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, 13) => block_avx512::<13>(x, w, c, from, ahead, out, ld),
            (Kernel::Avx512, _) => block_avx512::<14>(x, w, c, from, ahead, out, ld),
        }
    }
}

/// Where the sums of row r start: `at + r · step`.
#[derive(Clone, Copy)]
struct SumsFrom {
    at: *const f32,
    step: usize,
}

/// Weights to request while a block runs: `features` groups of the kernel's width from `at`.
#[derive(Clone, Copy)]
struct Ahead {
    at: *const f32,
    features: usize,
}

/// Requests the cache line at `p` into L2, not L1: the slice of weights it belongs to is read
/// after the current one, and an L1 of 32 KiB holds little more than the current slice. A hint,
/// so any address is allowed.
#[inline(always)]
fn fetch(p: *const f32) {
    // Safety: a prefetch never faults and changes no state a program can see.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast()) }
}

/// H rows × 16 features in 2·H registers of 8 lanes.
///
/// Safety: AVX2 and FMA; `rows` c · H values, `panel` c · 16, `from` H rows of 16 (the same
/// one for a bias), `out` H rows of 16.
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const H: usize>(
    rows: *const f32,
    panel: *const f32,
    c: usize,
    from: SumsFrom,
    ahead: Ahead,
    out: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    // Safety: the caller's bounds.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        for (r, a) in acc.iter_mut().enumerate() {
            let from = from.at.add(r * from.step);
            *a = [_mm256_loadu_ps(from), _mm256_loadu_ps(from.add(8))];
        }
        for i in 0..c {
            if i < ahead.features {
                fetch(ahead.at.wrapping_add(i * 16));
            }
            let w0 = _mm256_loadu_ps(panel.add(i * 16));
            let w1 = _mm256_loadu_ps(panel.add(i * 16 + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*rows.add(i * H + r));
                a[0] = _mm256_fmadd_ps(x, w0, a[0]);
                a[1] = _mm256_fmadd_ps(x, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * ld), a[0]);
            _mm256_storeu_ps(out.add(r * ld + 8), a[1]);
        }
    }
}

/// H rows × 32 features in 2·H registers of 16 lanes.
///
/// Safety: AVX-512F; `rows` c · H values, `panel` c · 32, `from` H rows of 32 (the same
/// one for a bias), `out` H rows of 32.
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const H: usize>(
    rows: *const f32,
    panel: *const f32,
    c: usize,
    from: SumsFrom,
    ahead: Ahead,
    out: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    // Safety: the caller's bounds.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; H];
        for (r, a) in acc.iter_mut().enumerate() {
            let from = from.at.add(r * from.step);
            *a = [_mm512_loadu_ps(from), _mm512_loadu_ps(from.add(16))];
        }
        for i in 0..c {
            if i < ahead.features {
                fetch(ahead.at.wrapping_add(i * 32));
                fetch(ahead.at.wrapping_add(i * 32 + 16));
            }
            let w0 = _mm512_loadu_ps(panel.add(i * 32));
            let w1 = _mm512_loadu_ps(panel.add(i * 32 + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*rows.add(i * H + r));
                a[0] = _mm512_fmadd_ps(x, w0, a[0]);
                a[1] = _mm512_fmadd_ps(x, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ld), a[0]);
            _mm512_storeu_ps(out.add(r * ld + 16), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 17.0).collect()
    }

    /// Every block of `x` (t × c, row-major) times `w` (k × c) plus `bias`, through the kernel,
    /// into a t × k output.
    fn product(kernel: Kernel, height: usize, x: &[f32], w: &[f32], bias: &[f32], [t, c, k]: [usize; 3]) -> Vec<f32> {
        let width = kernel.width();
        let packed = pack_weights(kernel, w, [k, c], [c, 1]);
        let mut padded = vec![0f32; k.div_ceil(width) * width];
        padded[..k].copy_from_slice(bias);
        let mut y = vec![f32::NAN; t * k];
        let mut rows = vec![f32::NAN; c * height];
        let mut tile = vec![f32::NAN; height * width];
        for r0 in (0..t).step_by(height) {
            pack_rows(height, x, r0..(r0 + height).min(t), |r| r * c, &(0..c).collect::<Vec<_>>(), &mut rows);
            for p in 0..k.div_ceil(width) {
                // Safety: `runs_here` (asked by the callers); c groups of rows and of the
                // panel, a bias of `width`, a tile of `height` rows of `width`.
                unsafe {
                    let panel = &packed[p * c * width..][..c * width];
                    block(
                        kernel,
                        height,
                        &rows,
                        panel,
                        Start::Bias(&padded[p * width..]),
                        &[],
                        tile.as_mut_ptr(),
                        width,
                    )
                };
                for j in 0..height.min(t - r0) {
                    for f in 0..width.min(k - p * width) {
                        y[(r0 + j) * k + p * width + f] = tile[j * width + f];
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_a_float64_product_on_both_kernels() {
        // Rows and features off the block and panel sizes, one row, one feature.
        for kernel in [Kernel::Avx2, Kernel::Avx512] {
            if !kernel.runs_here() {
                eprintln!("{kernel:?} does not run here");
                continue;
            }
            for ([t, c, k], height) in [[12, 32, 32], [25, 7, 45], [1, 19, 3], [13, 1, 64], [40, 64, 1], [77, 9, 33]]
                .into_iter()
                .flat_map(|shape| kernel.heights().map(move |h| (shape, h)))
            {
                let (x, w, b) = (values(t * c, 1), values(k * c, 2), values(k, 3));
                let y = product(kernel, height, &x, &w, &b, [t, c, k]);
                for r in 0..t {
                    for f in 0..k {
                        let want = b[f] as f64 + (0..c).map(|i| x[r * c + i] as f64 * w[f * c + i] as f64).sum::<f64>();
                        let got = y[r * k + f] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{kernel:?} height {height}, {t}x{c}x{k} ({r},{f}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_product_in_slices_of_features_gives_the_same_bits() {
        for kernel in [Kernel::Avx2, Kernel::Avx512] {
            if !kernel.runs_here() {
                continue;
            }
            let (height, width, c) = (*kernel.heights().start(), kernel.width(), 37);
            let (x, w, b) = (values(height * c, 8), values(width * c, 9), values(width, 10));
            let packed = pack_weights(kernel, &w, [width, c], [c, 1]);
            let mut rows = vec![0f32; c * height];
            pack_rows(height, &x, 0..height, |r| r * c, &(0..c).collect::<Vec<_>>(), &mut rows);
            let [mut whole, mut sliced] = [vec![f32::NAN; height * width], vec![f32::NAN; height * width]];
            // Safety: runs here; c groups of rows and of the panel, a tile of height × width.
            unsafe {
                block(kernel, height, &rows, &packed, Start::Bias(&b), &[], whole.as_mut_ptr(), width);
                for (i, s) in [(0, 10), (10, 30), (30, c)].into_iter().enumerate() {
                    let start = if i == 0 { Start::Bias(&b) } else { Start::Out };
                    let part = (&rows[s.0 * height..s.1 * height], &packed[s.0 * width..s.1 * width]);
                    block(kernel, height, part.0, part.1, start, &packed, sliced.as_mut_ptr(), width);
                }
            }
            assert!(whole.iter().zip(&sliced).all(|(p, q)| p.to_bits() == q.to_bits()), "{kernel:?}");
        }
    }

    #[test]
    fn the_height_leaves_the_least_padding() {
        assert_eq!(Kernel::Avx512.height_for(77), 13);
        assert_eq!(Kernel::Avx512.height_for(14), 14);
        assert_eq!(Kernel::Avx512.height_for(256), 13);
        assert_eq!(Kernel::Avx2.height_for(77), 6);
        assert_eq!(Kernel::Avx2.height_for(8), 4);
        for t in 1..300 {
            assert!(Kernel::Avx512.heights().contains(&Kernel::Avx512.height_for(t)));
        }
    }

    #[test]
    fn both_kernels_give_the_same_bits() {
        if !Kernel::Avx512.runs_here() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let [t, c, k] = [30, 50, 70];
        let (x, w, b) = (values(t * c, 4), values(k * c, 5), values(k, 6));
        let [a, z] = [Kernel::Avx2, Kernel::Avx512]
            .map(|kernel| product(kernel, *kernel.heights().end(), &x, &w, &b, [t, c, k]));
        assert!(a.iter().zip(&z).all(|(p, q)| p.to_bits() == q.to_bits()));
        for height in Kernel::Avx512.heights() {
            let y = product(Kernel::Avx512, height, &x, &w, &b, [t, c, k]);
            assert!(y.iter().zip(&z).all(|(p, q)| p.to_bits() == q.to_bits()), "height {height}");
        }
    }

    #[test]
    fn token_major_rows_pack_feature_by_feature_for_every_height_and_count() {
        // Row strides past the features, and 4 KiB (rows sharing an L1 set); feature counts
        // under, at and past one tile of 16.
        for stride_past in [0, 5, 1024] {
            for c in [1, 3, 16, 17, 37] {
                let stride = c + stride_past;
                let x = values(20 * stride + c, 11);
                for height in (4..=MOST_ROWS).rev() {
                    for rows in [0..1, 2..2 + height, 3..3 + height / 2] {
                        let count = rows.len();
                        let mut got = vec![f32::NAN; c * height];
                        pack_rows(height, &x, rows.clone(), |r| r * stride, &(0..c).collect::<Vec<_>>(), &mut got);
                        for i in 0..c {
                            for r in 0..height {
                                let want = if r < count { x[(rows.start + r) * stride + i] } else { 0.0 };
                                assert_eq!(
                                    got[i * height + r],
                                    want,
                                    "c {c}, stride {stride}, height {height}, rows {rows:?}: feature {i}, row {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_pack_alike_from_any_feature_layout() {
        // The same 5 × c rows stored token-major (features side by side: the tiled path) and
        // channels-first (the gather); 37 features end in a partial tile.
        for c in [3, 37] {
            let t = 5;
            let x = values(t * c, 7);
            let xt: Vec<f32> = (0..c * t).map(|i| x[(i % t) * c + i / t]).collect();
            let (side_by_side, apart): (Vec<usize>, Vec<usize>) = (0..c).map(|i| (i, i * t)).unzip();
            for kernel in [Kernel::Avx2, Kernel::Avx512] {
                let height = *kernel.heights().end();
                let [mut a, mut b] = [vec![f32::NAN; c * height], vec![f32::NAN; c * height]];
                pack_rows(height, &x, 1..5, |r| r * c, &side_by_side, &mut a);
                pack_rows(height, &xt, 1..5, |r| r, &apart, &mut b);
                assert_eq!(a, b, "{c} features");
                assert_eq!(a[height + 2], x[3 * c + 1], "feature 1 of row 3");
                assert_eq!(a[(c - 1) * height], x[c + c - 1], "the last feature of row 1");
                assert!(a.chunks_exact(height).all(|g| g[4..].iter().all(|&v| v == 0.0)), "zero past the rows");
            }
        }
    }
}
