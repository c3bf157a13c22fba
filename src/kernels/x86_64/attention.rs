//! Attention for one block of queries (as many as [`lanes`] gives), on x86-64 with AVX2 and
//! FMA: `O = softmax(scale · Q Kᵀ) V` without the full score matrix.
//!
//! Both products run on the linear layers' kernel (`super::linear`): it broadcasts one value per
//! row of a block and loads whole vectors of its panel, so that it issues about one load per
//! two multiply-adds, where the convolutions' matrix kernel issued one per multiply-add. The
//! block's queries are the panel: `Qᵀ`, d rows of [`lanes`] values.
//! - The scores come out transposed, `Sᵀ = K · Qᵀ` (the keys as the kernel's rows, packed once
//!   per head by [`pack_keys`]), one row per key and one lane per query. The softmax over the
//!   keys then runs down the columns, a whole row of lanes at a time whatever the number of
//!   keys.
//! - `Sᵀ` is already a panel for the second product, `Oᵀ = Vᵀ · P`, whose rows are the value
//!   features (packed once per head by [`pack_values`]). The 1 / sum of each query's
//!   exponentials scales its output column rather than the scores.
//!
//! A block's scores (keys × lanes) stay in L2 for large token counts, where the whole matrix
//! (tokens², for every head) would not. Each lane's sums add the features in order from zero,
//! one fused multiply-add each, on either kernel, so AVX2 and AVX-512 give the same bits.
//!
//! The exponential is the row softmax's (`softmax::exp_nonpositive`).

use std::arch::x86_64::*;

use super::linear::{self, Start, MOST_WIDTH};
use super::softmax::{exp_nonpositive, exp_nonpositive_512};
use crate::kernels::gemm::Kernel;

/// The sizes of one head: `keys` (S), `depth` (d, the query and key features) and `features`
/// (dv, the value features).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub keys: usize,
    pub depth: usize,
    pub features: usize,
}

/// An additive mask on a block's scores (a causal mask, padding): the value for query lane `i`
/// and key `j` is `values[i · query + j · key]`, for the block's first `queries` lanes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mask<'a> {
    pub values: &'a [f32],
    pub query: usize,
    pub key: usize,
    pub queries: usize,
}

/// Queries per block: the kernel's panel width.
pub(crate) const fn lanes(kernel: Kernel) -> usize {
    kernel.width()
}

impl Head {
    /// Rows per block of the keys, and of the value features.
    fn heights(self, kernel: Kernel) -> [usize; 2] {
        [kernel.height_for(self.keys), kernel.height_for(self.features)]
    }

    /// Length of [`pack_keys`]' output.
    pub(crate) fn keys_len(self, kernel: Kernel) -> usize {
        let [hk, _] = self.heights(kernel);
        self.keys.div_ceil(hk) * hk * self.depth
    }

    /// Length of [`pack_values`]' output.
    pub(crate) fn values_len(self, kernel: Kernel) -> usize {
        let [_, hv] = self.heights(kernel);
        self.features.div_ceil(hv) * hv * self.keys
    }

    /// Length of a block's scratch for its scores.
    pub(crate) fn scores_len(self, kernel: Kernel) -> usize {
        let [hk, _] = self.heights(kernel);
        self.keys.div_ceil(hk) * hk * lanes(kernel)
    }

    /// Length of a block's output, `Oᵀ`: rows of [`lanes`] for the value features, padded to
    /// whole blocks (the rows past `features` are scratch).
    pub(crate) fn out_len(self, kernel: Kernel) -> usize {
        let [_, hv] = self.heights(kernel);
        self.features.div_ceil(hv) * hv * lanes(kernel)
    }
}

/// The keys of one head as the kernel's rows: key j's feature i is at `k[key(j) + depth[i]]`.
pub(crate) fn pack_keys(
    kernel: Kernel,
    head: Head,
    k: &[f32],
    key: impl Fn(usize) -> usize,
    depth: &[usize],
    packed: &mut [f32],
) {
    let [hk, _] = head.heights(kernel);
    assert!(depth.len() == head.depth && packed.len() == head.keys_len(kernel), "attention: keys to pack");
    pack_in_blocks(hk, head.keys, k, key, depth, packed);
}

/// The values of one head as the kernel's rows (one per value feature): feature f of key j is
/// at `v[feature(f) + keys[j]]`.
pub(crate) fn pack_values(
    kernel: Kernel,
    head: Head,
    v: &[f32],
    feature: impl Fn(usize) -> usize,
    keys: &[usize],
    packed: &mut [f32],
) {
    let [_, hv] = head.heights(kernel);
    assert!(keys.len() == head.keys && packed.len() == head.values_len(kernel), "attention: values to pack");
    pack_in_blocks(hv, head.features, v, feature, keys, packed);
}

/// `count` rows of `x` (row r at `row(r)`, its features at `features`) packed by
/// `linear::pack_rows` in blocks of `height`, one after another in `packed`.
fn pack_in_blocks(
    height: usize,
    count: usize,
    x: &[f32],
    row: impl Fn(usize) -> usize,
    features: &[usize],
    packed: &mut [f32],
) {
    for (b, rows) in packed.chunks_exact_mut(features.len() * height).enumerate() {
        linear::pack_rows(height, x, b * height..((b + 1) * height).min(count), &row, features, rows);
    }
}

/// One block of [`lanes`] queries of one head. `keys` and `values` come from [`pack_keys`] and
/// [`pack_values`]; `queries` holds `Qᵀ` for the block, d rows of [`lanes`] values. `scores`
/// is scratch of [`Head::scores_len`]; `out` ([`Head::out_len`]) gets `Oᵀ`, a row of lanes per
/// value feature (the lanes past the block's queries hold the attention of a zero query). With
/// a `mask`, the softmax runs over `scale · q·k + mask`, as an exported graph adds it.
///
/// Panics unless `kernel.runs_here()` and the slices hold what is described.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block(
    kernel: Kernel,
    head: Head,
    keys: &[f32],
    values: &[f32],
    queries: &[f32],
    scale: f32,
    mask: Option<Mask>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let Head { keys: s, depth: d, features: dv } = head;
    let [hk, hv] = head.heights(kernel);
    let n = lanes(kernel);
    assert!(kernel.runs_here(), "attention: this CPU cannot run {kernel:?}");
    assert!(s > 0 && d > 0 && dv > 0, "attention: no keys, no depth or no features");
    assert!(keys.len() == head.keys_len(kernel) && values.len() == head.values_len(kernel));
    assert!(queries.len() == d * n && scores.len() == head.scores_len(kernel) && out.len() == head.out_len(kernel));
    if let Some(m) = mask {
        assert!(m.queries > 0 && m.queries <= n, "attention: a mask for {} queries", m.queries);
        assert!(m.values.len() > (m.queries - 1) * m.query + (s - 1) * m.key, "attention: a short mask");
    }
    const ZERO: [f32; MOST_WIDTH] = [0.0; MOST_WIDTH];
    for (rows, tile) in keys.chunks_exact(d * hk).zip(scores.chunks_exact_mut(hk * n)) {
        // Safety: `runs_here`, `hk` one of the kernel's heights; d groups of hk rows, a panel
        // of d · n, a zero bias of n, a tile of hk rows of n.
        unsafe { linear::block(kernel, hk, rows, queries, Start::Bias(&ZERO), &[], tile.as_mut_ptr(), n) };
    }
    let scores = &mut scores[..s * n];
    // A mask is added to the scaled scores, so the scale is applied here and not again.
    let scale = match mask {
        Some(m) => {
            let gathered = kernel == Kernel::Avx512 && (n - 1) * m.query <= i32::MAX as usize;
            if gathered {
                // Safety: AVX-512F (`runs_here`); the mask's reads are checked by the assert
                // above (the last query's value for the last key is inside `values`).
                unsafe { add_mask_512(scores, scale, m) };
            } else {
                for (j, row) in scores.chunks_exact_mut(n).enumerate() {
                    for (i, x) in row.iter_mut().enumerate() {
                        *x *= scale;
                        if i < m.queries {
                            *x += m.values[i * m.query + j * m.key];
                        }
                    }
                }
            }
            1.0
        }
        None => scale,
    };
    // Safety: the kernel's instructions (`runs_here`); rows of its width.
    let sums = unsafe {
        match kernel {
            Kernel::Avx512 => exponentials_512(scores, scale),
            Kernel::Avx2 => exponentials(scores, scale),
        }
    };
    for (rows, tile) in values.chunks_exact(s * hv).zip(out.chunks_exact_mut(hv * n)) {
        // Safety: as above, with s groups of hv rows and the s rows of n exponentials.
        unsafe { linear::block(kernel, hv, rows, scores, Start::Bias(&ZERO), &[], tile.as_mut_ptr(), n) };
    }
    for row in out.chunks_exact_mut(n) {
        row.iter_mut().zip(&sums).for_each(|(x, b)| *x *= b);
    }
}

/// `scores` (rows of 32) scaled by `scale`, plus the mask in the first `m.queries` lanes: the
/// scalar loop's values, a row of lanes at a time, the mask's column read by gathers.
///
/// Safety: AVX-512F; `m.values[i · m.query + j · m.key]` inside the mask for i < m.queries and
/// every row j; `(31 · m.query)` fits an i32.
#[target_feature(enable = "avx512f")]
unsafe fn add_mask_512(scores: &mut [f32], scale: f32, m: Mask) {
    let live_lanes = |half: usize| -> __mmask16 {
        let first = half * 16;
        let live = m.queries.saturating_sub(first).min(16);
        ((1u32 << live) - 1) as u16
    };
    // Safety: the caller's bounds; the gathers read only lanes under their masks.
    unsafe {
        let k = _mm512_set1_ps(scale);
        let step = _mm512_set1_epi32(m.query as i32);
        let index =
            [_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), step); 2];
        let index = [index[0], _mm512_add_epi32(index[1], _mm512_slli_epi32::<4>(step))];
        let live = [live_lanes(0), live_lanes(1)];
        for (j, row) in scores.chunks_exact_mut(32).enumerate() {
            let base = m.values.as_ptr().add(j * m.key);
            for half in 0..2 {
                let p = row[half * 16..].as_mut_ptr();
                let add = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), live[half], index[half], base.cast());
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(p), k), add));
            }
        }
    }
}

/// Below this exponent an exponential is taken as 0: next to the column's maximum (1) it is
/// below 1e-27, far under a float's precision, and the tiny values a mask leaves (e^-87 and the
/// like) made the second product's multiply-adds take the CPU's slow path for subnormal
/// products, which doubled a causally masked block's time.
const NEGLIGIBLE: f32 = -64.0;

/// Each column of `scores` (rows of 16) becomes `e^(scale · (x − max))` over its column's
/// maximum, 0 below [`NEGLIGIBLE`]; returns 1 / each column's sum (the first 16 values). A
/// column holding NaN or +∞ comes out all NaN.
///
/// Safety: AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn exponentials(scores: &mut [f32], scale: f32) -> [f32; MOST_WIDTH] {
    const N: usize = Kernel::Avx2.width();
    let mut inverse = [0f32; MOST_WIDTH];
    // Safety, for the block: AVX2 and FMA; every access is inside a row of N = 2 × 8 values.
    unsafe {
        let k = _mm256_set1_ps(scale);
        for half in 0..2 {
            let lanes = half * 8;
            let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
            for row in scores.chunks_exact(N) {
                top = _mm256_max_ps(top, _mm256_loadu_ps(row[lanes..].as_ptr()));
            }
            let mut sum = _mm256_setzero_ps();
            for row in scores.chunks_exact_mut(N) {
                let p = row[lanes..].as_mut_ptr();
                let a = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), top), k);
                let e = _mm256_and_ps(exp_nonpositive(a), _mm256_cmp_ps::<_CMP_NLT_UQ>(a, _mm256_set1_ps(NEGLIGIBLE)));
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
            _mm256_storeu_ps(inverse[lanes..].as_mut_ptr(), _mm256_div_ps(_mm256_set1_ps(1.0), sum));
        }
    }
    inverse
}

/// [`exponentials`] on rows of 32, each in two AVX-512 registers: the same bits per lane.
///
/// Safety: AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn exponentials_512(scores: &mut [f32], scale: f32) -> [f32; MOST_WIDTH] {
    const N: usize = Kernel::Avx512.width();
    let mut inverse = [0f32; MOST_WIDTH];
    // Safety, for the block: AVX-512F; every access is one row of N = 2 × 16 values.
    unsafe {
        let k = _mm512_set1_ps(scale);
        let mut top = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
        for row in scores.chunks_exact(N) {
            for (half, t) in top.iter_mut().enumerate() {
                *t = _mm512_max_ps(*t, _mm512_loadu_ps(row[half * 16..].as_ptr()));
            }
        }
        let mut sum = [_mm512_setzero_ps(); 2];
        for row in scores.chunks_exact_mut(N) {
            for (half, (t, s)) in top.iter().zip(&mut sum).enumerate() {
                let p = row[half * 16..].as_mut_ptr();
                let a = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(p), *t), k);
                let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, _mm512_set1_ps(NEGLIGIBLE));
                let e = _mm512_maskz_mov_ps(keep, exp_nonpositive_512(a));
                _mm512_storeu_ps(p, e);
                *s = _mm512_add_ps(*s, e);
            }
        }
        for (half, s) in sum.iter().enumerate() {
            _mm512_storeu_ps(inverse[half * 16..].as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), *s));
        }
    }
    inverse
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Float64 attention of query `t`: `q` d × T (Qᵀ), `k` S × d, `v` dv × S (Vᵀ); one value per
    /// feature.
    fn reference(q: &[f32], k: &[f32], v: &[f32], head: Head, t: usize, tokens: usize, scale: f64) -> Vec<f64> {
        let Head { keys: s, depth: d, features: dv } = head;
        let scores: Vec<f64> = (0..s)
            .map(|j| (0..d).map(|c| q[c * tokens + t] as f64 * k[j * d + c] as f64).sum::<f64>() * scale)
            .collect();
        let max = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..dv).map(|f| (0..s).map(|j| e[j] * v[f * s + j] as f64).sum::<f64>() / sum).collect()
    }

    /// Keys (S × d, row-major) and values (dv × S) packed for `kernel`.
    fn packed(kernel: Kernel, head: Head, k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Head { keys: s, depth: d, features: dv } = head;
        let mut keys = vec![f32::NAN; head.keys_len(kernel)];
        pack_keys(kernel, head, k, |j| j * d, &(0..d).collect::<Vec<_>>(), &mut keys);
        let mut values = vec![f32::NAN; head.values_len(kernel)];
        pack_values(kernel, head, v, |f| f * s, &(0..s).collect::<Vec<_>>(), &mut values);
        assert_eq!(dv * s, v.len());
        (keys, values)
    }

    /// One block through `kernel`: `q` holds d rows of `stride` queries, the block's from `t0`;
    /// `kv` the keys (S × d) and the values (dv × S).
    fn run(kernel: Kernel, head: Head, kv: [&[f32]; 2], q: &[f32], stride: usize, t0: usize, scale: f32) -> Vec<f32> {
        let [k, v] = kv;
        let n = lanes(kernel);
        let (keys, values) = packed(kernel, head, k, v);
        let panel: Vec<f32> = (0..head.depth * n)
            .map(|i| {
                let (c, j) = (i / n, t0 + i % n);
                if j < stride {
                    q[c * stride + j]
                } else {
                    0.0
                }
            })
            .collect();
        let mut scores = vec![f32::NAN; head.scores_len(kernel)];
        let mut out = vec![f32::NAN; head.out_len(kernel)];
        block(kernel, head, &keys, &values, &panel, scale, None, &mut scores, &mut out);
        out
    }

    #[test]
    fn blocks_match_a_float64_attention() {
        for kernel in [Kernel::Avx2, Kernel::Avx512] {
            if !kernel.runs_here() {
                continue;
            }
            let n = lanes(kernel);
            // Key counts below, at and past the block heights; depths and features not multiples
            // of anything; a large scale, where the maximum matters.
            for (s, d, dv, scale) in [(1, 1, 1, 1.0), (7, 5, 3, 0.5), (64, 32, 40, 0.125), (301, 17, 13, 4.0)] {
                let head = Head { keys: s, depth: d, features: dv };
                let tokens = n + 3;
                let value = |i: usize, m: usize| ((i * m % 23) as f32 - 11.0) / 9.0;
                let q: Vec<f32> = (0..d * tokens).map(|i| value(i, 7)).collect();
                let k: Vec<f32> = (0..s * d).map(|i| value(i, 11)).collect();
                let v: Vec<f32> = (0..dv * s).map(|i| value(i, 13)).collect();
                for t0 in [0, 3] {
                    let out = run(kernel, head, [&k, &v], &q, tokens, t0, scale);
                    for lane in 0..n {
                        let want = reference(&q, &k, &v, head, t0 + lane, tokens, scale as f64);
                        for (f, w) in want.iter().enumerate() {
                            let got = out[f * n + lane] as f64;
                            assert!(
                                (got - w).abs() < 1e-5 * (1.0 + w.abs()),
                                "{kernel:?} {head:?} t{}: {got} vs {w}",
                                t0 + lane
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn both_kernels_give_the_same_bits() {
        if !Kernel::Avx512.runs_here() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let head = Head { keys: 45, depth: 19, features: 23 };
        let tokens = 40;
        let value = |i: usize, m: usize| ((i * m % 29) as f32 - 14.0) / 7.0;
        let q: Vec<f32> = (0..head.depth * tokens).map(|i| value(i, 5)).collect();
        let k: Vec<f32> = (0..45 * 19).map(|i| value(i, 3)).collect();
        let v: Vec<f32> = (0..23 * 45).map(|i| value(i, 11)).collect();
        // The AVX2 blocks of 16 queries from 0 and 16 against the AVX-512 block of 32.
        let wide = run(Kernel::Avx512, head, [&k, &v], &q, tokens, 0, 0.7);
        for t0 in [0, 16] {
            let narrow = run(Kernel::Avx2, head, [&k, &v], &q, tokens, t0, 0.7);
            for f in 0..head.features {
                for j in 0..16 {
                    let (a, b) = (narrow[f * 16 + j], wide[f * 32 + t0 + j]);
                    assert_eq!(a.to_bits(), b.to_bits(), "feature {f}, query {}: {a} vs {b}", t0 + j);
                }
            }
        }
    }

    #[test]
    fn a_nan_query_spoils_only_its_own_column() {
        let kernel = Kernel::detect();
        if !kernel.runs_here() {
            return;
        }
        let n = lanes(kernel);
        let head = Head { keys: 9, depth: 2, features: 2 };
        let mut q = vec![0.5f32; 2 * n];
        q[4] = f32::NAN;
        let out = run(kernel, head, [&[0.25; 18], &[1.0; 18]], &q, n, 0, 1.0);
        for (i, x) in out[..head.features * n].iter().enumerate() {
            assert_eq!(x.is_nan(), i % n == 4, "[{i}] {x}");
        }
    }
}
