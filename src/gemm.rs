//! The matrix products of our convolutions on x86-64 with AVX2 and FMA: `M = U · V` with `U`
//! (k × c, constant weights), `V` (c × t, one row per input channel) and `M` (k × t), all small:
//! k and c are 32–256 channels, t is 16–1024 tiles or pixels. Used for the 16 products of a
//! Winograd convolution (`winograd`) and for 1×1 convolutions (`pointwise`).
//!
//! Why our own: a general matrix product packs both operands on every call. Here `U` is
//! constant, so it is packed once at load ([`pack_weights`]), and `V` needs no packing at all:
//! the kernel reads rows of 16 columns straight from a block of it. With `matrixmultiply`,
//! packing was 14 % of a student call; tract-linalg's kernels, fed packed operands, were no
//! faster (README, "Performance"). Other CPUs (aarch64's NEON included, where a kernel of ours
//! is not measured) keep `matrixmultiply` or tract's own.
//!
//! The micro-kernel keeps a 6 × 16 block of `M` in 12 AVX registers and adds, for each input
//! channel, one 6-value column of `U` times one 16-value row of `V`.

/// Output channels per block of the micro-kernel (rows of `M`).
pub(crate) const MR: usize = 6;
/// Tiles per block of the micro-kernel (columns of `M`).
pub(crate) const NR: usize = 16;

/// `U` (k × c, row-major) in the kernel's layout: panels of [`MR`] output channels, zero-padded,
/// each as `c` columns of `MR` values.
pub fn pack_weights(u: &[f32], k: usize, c: usize) -> Vec<f32> {
    let panels = k.div_ceil(MR);
    let mut packed = vec![0f32; panels * c * MR];
    for (ki, row) in u.chunks_exact(c).enumerate() {
        let panel = &mut packed[(ki / MR) * c * MR..][..c * MR];
        for (ci, &x) in row.iter().enumerate() {
            panel[ci * MR + ki % MR] = x;
        }
    }
    packed
}

/// Length of [`pack_weights`]' output.
pub fn packed_len(k: usize, c: usize) -> usize {
    k.div_ceil(MR) * c * MR
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// `m = u · v`: `u` from [`pack_weights`], `v` (c × t) and `m` (k × t) row-major. Panics unless
/// [`available`].
pub fn product(u: &[f32], v: &[f32], m: &mut [f32], [k, c, t]: [usize; 3]) {
    assert!(available(), "product: no AVX2 and FMA");
    assert!(u.len() >= packed_len(k, c) && v.len() >= c * t && m.len() >= k * t, "product: short operand");
    let panels = k.div_ceil(MR);
    // The last, partial block of tiles goes through a zero-padded copy of its columns.
    let mut tail = Vec::new();
    for t0 in (0..t).step_by(NR) {
        let width = NR.min(t - t0);
        let (rows, stride) = if width == NR {
            (&v[t0..], t)
        } else {
            tail.resize(c * NR, 0.0);
            for (dst, src) in tail.chunks_exact_mut(NR).zip(v.chunks_exact(t)) {
                dst[..width].copy_from_slice(&src[t0..]);
            }
            (&tail[..], NR)
        };
        assert!(c == 0 || rows.len() >= (c - 1) * stride + NR, "product: short rows");
        for p in 0..panels {
            let up = &u[p * c * MR..][..c * MR];
            let height = MR.min(k - p * MR);
            if width == NR {
                let out = &mut m[p * MR * t + t0..];
                assert!(out.len() >= (height - 1) * t + NR, "product: short output");
                // Safety: `available()`, the operand lengths above and the output length here.
                unsafe { block_avx2_fma(up, rows, stride, out.as_mut_ptr(), t, height, &[0.0; MR]) };
            } else {
                let mut acc = [[0f32; NR]; MR];
                // Safety: as above, into a whole MR × NR block.
                unsafe { block_avx2_fma(up, rows, stride, acc.as_mut_ptr().cast(), NR, MR, &[0.0; MR]) };
                for (r, a) in acc.iter().enumerate().take(height) {
                    m[(p * MR + r) * t + t0..][..width].copy_from_slice(&a[..width]);
                }
            }
        }
    }
}

/// One `MR × NR` block of `M` plus `init` (row r of the block starts from `init[r]`): `up` is
/// one panel of `U` (c columns of `MR`), `rows` the first of its c rows of `NR` tiles, `stride`
/// apart. The first `height` rows of the block are stored at `out`, `ld` apart, straight from
/// the registers. The 12 accumulators are named registers:
/// written as plain Rust over a `[[f32; 16]; 6]`, the compiler vectorized the loop but stored
/// the array back to memory on every step, at half the speed.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product() {
        if !available() {
            eprintln!("no AVX2 and FMA here: the kernel cannot run");
            return;
        }
        // Sizes around the block edges: k not a multiple of 6, t not a multiple of 16.
        for (k, c, t) in [(6, 1, 16), (32, 32, 256), (7, 5, 17), (13, 3, 5), (1, 9, 33)] {
            let u: Vec<f32> = (0..k * c).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
            let v: Vec<f32> = (0..c * t).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
            let mut m = vec![f32::NAN; k * t];
            product(&pack_weights(&u, k, c), &v, &mut m, [k, c, t]);
            for ki in 0..k {
                for ti in 0..t {
                    let want: f64 = (0..c).map(|ci| u[ki * c + ci] as f64 * v[ci * t + ti] as f64).sum();
                    let got = m[ki * t + ti] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "k{k} c{c} t{t} at ({ki},{ti}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
