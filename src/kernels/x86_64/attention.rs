//! Attention for one block of [`NR`] queries, on x86-64 with AVX2 and FMA:
//! `O = softmax(scale · Q Kᵀ) V` without the full score matrix.
//!
//! Both products run on the matrix kernel (`gemm`) with the keys and the values as its packed,
//! constant-per-head operand. The scores come out transposed, `Sᵀ = K · Qᵀ` (one row per key,
//! one lane per query), so that the softmax over the keys runs down the columns, 16 queries at
//! a time whatever the number of keys, and `Sᵀ` is already the row layout the second product,
//! `Oᵀ = Vᵀ · P`, reads. The 1 / sum of each query's exponentials scales its output column
//! rather than the scores. A block's scores (keys × 16) stay in L2 for large token counts, where
//! the whole matrix (tokens², for every head) would not.
//!
//! The exponential is the row softmax's (`softmax::exp_nonpositive`).

use std::arch::x86_64::*;

use super::softmax::{exp_nonpositive, exp_nonpositive_512};
use crate::kernels::gemm::{self, Kernel, MR, NR};

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

/// One block of `NR` queries of one head. `keys` is `K` (S × d) and `values` is `Vᵀ`
/// (dv × S), both from [`gemm::pack_weights`]; `queries` holds `Qᵀ` for the block, d rows of
/// [`NR`] values `stride` apart. `scores` is scratch for S × NR values; `out` gets `Oᵀ`, dv rows
/// of NR (the lanes past the block's queries hold the attention of a zero query). With a
/// `mask`, the softmax runs over `scale · q·k + mask`, as an exported graph adds it.
///
/// Panics unless `kernel.runs_here()` and the slices hold what is described.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block(
    kernel: Kernel,
    head: Head,
    keys: &[f32],
    values: &[f32],
    queries: &[f32],
    stride: usize,
    scale: f32,
    mask: Option<Mask>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let Head { keys: s, depth: d, features: dv } = head;
    assert!(kernel.runs_here(), "attention: this CPU cannot run {kernel:?}");
    assert!(s > 0 && d > 0, "attention: no keys or no features");
    assert!(keys.len() >= gemm::packed_len(s, d) && values.len() >= gemm::packed_len(dv, s));
    assert!(queries.len() >= (d - 1) * stride + NR && scores.len() >= s * NR && out.len() >= dv * NR);
    if let Some(m) = mask {
        assert!(m.queries > 0 && m.queries <= NR, "attention: a mask for {} queries", m.queries);
        assert!(m.values.len() > (m.queries - 1) * m.query + (s - 1) * m.key, "attention: a short mask");
    }
    // Safety: `runs_here` and the lengths asserted above: d rows of NR `stride` apart in
    // `queries`, s rows of NR in `scores`, dv rows of NR in `out`.
    unsafe {
        gemm::block(kernel, keys, [s, d], 0..s.div_ceil(MR), queries, stride, scores.as_mut_ptr(), NR, None);
        // A mask is added to the scaled scores, so the scale is applied here and not again.
        let scale = match mask {
            Some(m) => {
                for (j, row) in scores[..s * NR].chunks_exact_mut(NR).enumerate() {
                    for (i, x) in row.iter_mut().enumerate() {
                        *x *= scale;
                        if i < m.queries {
                            *x += m.values[i * m.query + j * m.key];
                        }
                    }
                }
                1.0
            }
            None => scale,
        };
        let sums = match kernel {
            Kernel::Avx512 => exponentials_512(&mut scores[..s * NR], scale),
            Kernel::Avx2 => exponentials(&mut scores[..s * NR], scale),
        };
        gemm::block(kernel, values, [dv, s], 0..dv.div_ceil(MR), scores, NR, out.as_mut_ptr(), NR, None);
        scale_columns(&mut out[..dv * NR], &sums);
    }
}

/// Each column of `scores` (rows of NR) becomes `e^(scale · (x − max))` over its column's
/// maximum; returns 1 / each column's sum. A column holding NaN or +∞ comes out all NaN.
///
/// Safety: AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn exponentials(scores: &mut [f32], scale: f32) -> [f32; NR] {
    let mut inverse = [0f32; NR];
    // Safety, for the block: AVX2 and FMA; every access is inside a row of NR = 2 × 8 values.
    unsafe {
        let k = _mm256_set1_ps(scale);
        for half in 0..2 {
            let lanes = half * 8;
            let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
            for row in scores.chunks_exact(NR) {
                top = _mm256_max_ps(top, _mm256_loadu_ps(row[lanes..].as_ptr()));
            }
            let mut sum = _mm256_setzero_ps();
            for row in scores.chunks_exact_mut(NR) {
                let p = row[lanes..].as_mut_ptr();
                let e = exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), top), k));
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
            _mm256_storeu_ps(inverse[lanes..].as_mut_ptr(), _mm256_div_ps(_mm256_set1_ps(1.0), sum));
        }
    }
    inverse
}

/// [`exponentials`] with a whole row of NR in one AVX-512 register: the same bits.
///
/// Safety: AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn exponentials_512(scores: &mut [f32], scale: f32) -> [f32; NR] {
    const { assert!(NR == 16) };
    let mut inverse = [0f32; NR];
    // Safety, for the block: AVX-512F; every access is one row of NR = 16 values.
    unsafe {
        let k = _mm512_set1_ps(scale);
        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
        for row in scores.chunks_exact(NR) {
            top = _mm512_max_ps(top, _mm512_loadu_ps(row.as_ptr()));
        }
        let mut sum = _mm512_setzero_ps();
        for row in scores.chunks_exact_mut(NR) {
            let p = row.as_mut_ptr();
            let e = exp_nonpositive_512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(p), top), k));
            _mm512_storeu_ps(p, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_storeu_ps(inverse.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), sum));
    }
    inverse
}

/// Multiplies lane `j` of each row of NR by `by[j]`.
fn scale_columns(rows: &mut [f32], by: &[f32; NR]) {
    for row in rows.chunks_exact_mut(NR) {
        for (x, b) in row.iter_mut().zip(by) {
            *x *= b;
        }
    }
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

    #[test]
    fn blocks_match_a_float64_attention() {
        for kernel in [Kernel::Avx2, Kernel::Avx512] {
            if !kernel.runs_here() {
                continue;
            }
            // Key counts below, at and past the 6-row panels; depths and features not multiples
            // of anything; a large scale, where the maximum matters.
            for (s, d, dv, scale) in [(1, 1, 1, 1.0), (7, 5, 3, 0.5), (64, 32, 40, 0.125), (301, 17, 13, 4.0)] {
                let head = Head { keys: s, depth: d, features: dv };
                let tokens = NR + 3;
                let value = |i: usize, m: usize| ((i * m % 23) as f32 - 11.0) / 9.0;
                let q: Vec<f32> = (0..d * tokens).map(|i| value(i, 7)).collect();
                let k: Vec<f32> = (0..s * d).map(|i| value(i, 11)).collect();
                let v: Vec<f32> = (0..dv * s).map(|i| value(i, 13)).collect();
                let (keys, values) = (gemm::pack_weights(&k, s, d), gemm::pack_weights(&v, dv, s));
                let mut scores = vec![f32::NAN; s * NR];
                let mut out = vec![f32::NAN; dv * NR];
                for t0 in [0, 3] {
                    block(kernel, head, &keys, &values, &q[t0..], tokens, scale, None, &mut scores, &mut out);
                    for lane in 0..NR {
                        let want = reference(&q, &k, &v, head, t0 + lane, tokens, scale as f64);
                        for (f, w) in want.iter().enumerate() {
                            let got = out[f * NR + lane] as f64;
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
        let value = |i: usize, m: usize| ((i * m % 29) as f32 - 14.0) / 7.0;
        let q: Vec<f32> = (0..head.depth * NR).map(|i| value(i, 5)).collect();
        let keys = gemm::pack_weights(&(0..45 * 19).map(|i| value(i, 3)).collect::<Vec<_>>(), 45, 19);
        let values = gemm::pack_weights(&(0..23 * 45).map(|i| value(i, 11)).collect::<Vec<_>>(), 23, 45);
        let [a, b] = [Kernel::Avx2, Kernel::Avx512].map(|kernel| {
            let (mut scores, mut out) = (vec![0f32; 45 * NR], vec![0f32; 23 * NR]);
            block(kernel, head, &keys, &values, &q, NR, 0.7, None, &mut scores, &mut out);
            out
        });
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn a_nan_query_spoils_only_its_own_column() {
        let kernel = Kernel::detect();
        if !kernel.runs_here() {
            return;
        }
        let head = Head { keys: 9, depth: 2, features: 2 };
        let mut q = vec![0.5f32; 2 * NR];
        q[4] = f32::NAN;
        let keys = gemm::pack_weights(&[0.25; 18], 9, 2);
        let values = gemm::pack_weights(&[1.0; 18], 2, 9);
        let (mut scores, mut out) = (vec![0f32; 9 * NR], vec![0f32; 2 * NR]);
        block(kernel, head, &keys, &values, &q, NR, 1.0, None, &mut scores, &mut out);
        for (i, x) in out.iter().enumerate() {
            assert_eq!(x.is_nan(), i % NR == 4, "[{i}] {x}");
        }
    }
}
