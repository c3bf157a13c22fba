//! The x86-64 micro-kernels of the matrix product (`crate::kernels::gemm`, which picks one and
//! describes both): AVX2+FMA on one panel of `U`, AVX-512 on up to five.

use crate::kernels::gemm::{MOST, MR, NR};

/// One `MR × NR` block of `M` plus `init` (row r of the block starts from `init[r]`): `up` is
/// one panel of `U` (c columns of `MR`), `rows` the first of its c rows of `NR` tiles, `stride`
/// apart. The first `height` rows of the block are stored at `out`, `ld` apart, straight from
/// the registers. The 12 accumulators are named registers:
/// written as plain Rust over a `[[f32; 16]; 6]`, the compiler vectorized the loop but stored
/// the array back to memory on every step, which was much slower.
///
/// Safety: the CPU has AVX2 and FMA; `up` holds c·MR values, `rows` c rows of NR, and `out`
/// has room for `height` rows of NR values `ld` apart.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn block_avx2_fma(
    up: &[f32],
    rows: &[f32],
    stride: usize,
    out: *mut f32,
    ld: usize,
    height: usize,
    init: &[f32; MR],
) {
    use std::arch::x86_64::*;
    let c = up.len() / MR;
    debug_assert!(c == 0 || rows.len() >= (c - 1) * stride + NR);
    let i = |r: usize| _mm256_set1_ps(init[r]);
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (i(0), i(1), i(2), i(3), i(4), i(5));
    let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5) = (a0, a1, a2, a3, a4, a5);
    let (mut u, mut v) = (up.as_ptr(), rows.as_ptr());
    for _ in 0..c {
        unsafe {
            let (lo, hi) = (_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8)));
            let w = _mm256_broadcast_ss(&*u);
            (a0, b0) = (_mm256_fmadd_ps(w, lo, a0), _mm256_fmadd_ps(w, hi, b0));
            let w = _mm256_broadcast_ss(&*u.add(1));
            (a1, b1) = (_mm256_fmadd_ps(w, lo, a1), _mm256_fmadd_ps(w, hi, b1));
            let w = _mm256_broadcast_ss(&*u.add(2));
            (a2, b2) = (_mm256_fmadd_ps(w, lo, a2), _mm256_fmadd_ps(w, hi, b2));
            let w = _mm256_broadcast_ss(&*u.add(3));
            (a3, b3) = (_mm256_fmadd_ps(w, lo, a3), _mm256_fmadd_ps(w, hi, b3));
            let w = _mm256_broadcast_ss(&*u.add(4));
            (a4, b4) = (_mm256_fmadd_ps(w, lo, a4), _mm256_fmadd_ps(w, hi, b4));
            let w = _mm256_broadcast_ss(&*u.add(5));
            (a5, b5) = (_mm256_fmadd_ps(w, lo, a5), _mm256_fmadd_ps(w, hi, b5));
            u = u.add(MR);
            v = v.add(stride);
        }
    }
    for (r, (a, b)) in [(a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5)].into_iter().enumerate().take(height)
    {
        unsafe {
            let row = out.add(r * ld);
            _mm256_storeu_ps(row, a);
            _mm256_storeu_ps(row.add(8), b);
        }
    }
}

/// [`block_avx2_fma`] for `P` panels at once (`up`: P consecutive panels of c columns of MR)
/// on AVX-512: rows `0 .. P·MR` of the block, the first `height` of them stored. The sums are
/// kept in `P·MR` registers of 16 lanes; each adds the same products in the same order as the
/// AVX2 kernel.
///
/// Safety: the CPU has AVX-512F; `up` holds P·c·MR values, `rows` c rows of NR, and `out` room
/// for `height` rows of NR values `ld` apart.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn block_avx512<const P: usize>(
    up: &[f32],
    rows: &[f32],
    stride: usize,
    out: *mut f32,
    ld: usize,
    height: usize,
    init: &[f32; MOST * MR],
) {
    use std::arch::x86_64::*;
    let c = up.len() / (P * MR);
    debug_assert!(up.len() == P * c * MR && (c == 0 || rows.len() >= (c - 1) * stride + NR));
    let mut acc = [[_mm512_setzero_ps(); MR]; P];
    for (q, a) in acc.iter_mut().enumerate() {
        for (r, ar) in a.iter_mut().enumerate() {
            *ar = _mm512_set1_ps(init[q * MR + r]);
        }
    }
    let u: [*const f32; P] = std::array::from_fn(|q| up[q * c * MR..].as_ptr());
    let mut v = rows.as_ptr();
    for ci in 0..c {
        // Safety: ci < c columns of each panel, and row ci of `rows` (checked by the caller).
        unsafe {
            let row = _mm512_loadu_ps(v);
            for (q, a) in acc.iter_mut().enumerate() {
                let col = u[q].add(ci * MR);
                for (r, ar) in a.iter_mut().enumerate() {
                    *ar = _mm512_fmadd_ps(_mm512_set1_ps(*col.add(r)), row, *ar);
                }
            }
            v = v.add(stride);
        }
    }
    // A loop of constant length, with constant indices once unrolled: an iterator that stops at
    // `height` made the compiler keep `acc` in memory and store it on every step of the sum.
    for i in 0..P * MR {
        if i < height {
            // Safety: row i < height of the caller's output.
            unsafe { _mm512_storeu_ps(out.add(i * ld), acc[i / MR][i % MR]) };
        }
    }
}
