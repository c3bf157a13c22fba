//! Softmax over the last axis of a float32 tensor, on x86-64 with AVX2 and FMA.
//!
//! Each row is one pass for the maximum and one for the exponentials and their sum, 8 lanes
//! wide, then a scale (why: `crate::ops::softmax`).
//!
//! The exponential: `2^n · e^r` with `n = round(x / ln 2)` and `|r| ≤ ln 2 / 2`, `e^r` by its
//! Taylor series to degree 7 (truncation below 1e-8 relative), `ln 2` split in two parts so that
//! `r` is exact to float precision (Cody & Waite). Arguments are `x − max ≤ 0`, clamped at −87
//! so that `2^n` stays a normal float. A row holding NaN or ±∞ comes out all NaN.

use std::arch::x86_64::*;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// `e^x` in each lane, for `x ≤ 0` (see the module docs).
///
/// Safety: AVX2 and FMA.
#[inline(always)]
pub(crate) unsafe fn exp_nonpositive(x: __m256) -> __m256 {
    unsafe {
        // NaN as the second operand, which `max` returns when either is NaN: a NaN score
        // spreads to its row's sum, and the whole row becomes NaN, as it should.
        let x = _mm256_max_ps(_mm256_set1_ps(-87.0), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        // ln 2 = 0.693359375 − 2.12194440e-4: the first part has few bits, so n · it is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        // Horner's rule on 1 + r + r²/2! + … + r⁷/7!.
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // 2^n: n + 127 in the exponent bits.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }
}

/// [`exp_nonpositive`] on 16 lanes, the same operations in the same order, so each lane gets
/// the same bits.
///
/// Safety: AVX-512F.
#[inline(always)]
pub(crate) unsafe fn exp_nonpositive_512(x: __m512) -> __m512 {
    unsafe {
        let x = _mm512_max_ps(_mm512_set1_ps(-87.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
    }
}

/// `y = softmax(x)` for one row (the tests' out-of-place reference of the in-place kernel).
///
/// Safety: AVX2 and FMA.
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax_row(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    // Safety: AVX2 and FMA (the caller's); both slices hold `len` floats.
    unsafe { softmax(x.as_ptr(), y.as_mut_ptr(), x.len()) }
}

/// `y = softmax(y)` for one row, in place: a tensor that nothing else reads needs no second one
/// (attention's score rows are the largest tensors of a call).
///
/// Safety: AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax_row_in_place(y: &mut [f32]) {
    let p = y.as_mut_ptr();
    // Safety: AVX2 and FMA (the caller's); `softmax` reads each value before it writes that
    // value's place, so the row may be its own output.
    unsafe { softmax(p, p, y.len()) }
}

/// The row kernel on `len` floats at `x` into `len` floats at `y`, which may be the same: the
/// maximum pass only reads, and the exponential pass reads each value before writing its place.
///
/// Safety: AVX2 and FMA; `x` valid for `len` reads and `y` for `len` writes.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax(x: *const f32, y: *mut f32, len: usize) {
    let whole = len / 8 * 8;
    // Safety, for the block: AVX2 and FMA; every vector access is inside `whole ≤ len` floats of
    // `x` and `y`, the last partial vector goes through `tail`.
    unsafe {
        let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
        for at in (0..whole).step_by(8) {
            top = _mm256_max_ps(top, _mm256_loadu_ps(x.add(at)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), top);
        let rest = len - whole;
        let mut tail = [0f32; 8];
        std::ptr::copy(x.add(whole), tail.as_mut_ptr(), rest);
        let max = lanes.iter().chain(&tail[..rest]).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let m = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for at in (0..whole).step_by(8) {
            let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x.add(at)), m));
            _mm256_storeu_ps(y.add(at), e);
            sum = _mm256_add_ps(sum, e);
        }
        if rest > 0 {
            // The last values through the buffer of 8, its unused lanes zeroed before the sum.
            tail[rest..].fill(max);
            let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            tail[rest..].fill(0.0);
            std::ptr::copy(tail.as_ptr(), y.add(whole), rest);
            sum = _mm256_add_ps(sum, _mm256_loadu_ps(tail.as_ptr()));
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let scale = 1.0 / lanes.iter().sum::<f32>();
        let scales = _mm256_set1_ps(scale);
        for at in (0..whole).step_by(8) {
            let p = y.add(at);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), scales));
        }
        for at in whole..len {
            *y.add(at) *= scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_two_ulps() {
        if !available() {
            return;
        }
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let mut got = [0f32; 8];
            // Safety: available() above.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp_nonpositive(_mm256_set1_ps(x))) };
            let want = (x as f64).exp();
            assert!(((got[0] as f64 - want) / want).abs() < 2.5e-7, "e^{x}: {} vs {want}", got[0]);
        }
    }

    #[test]
    fn both_widths_of_the_exponential_give_the_same_bits() {
        if !available() || !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let xs: Vec<f32> =
            (0..=87_016).map(|i| -(i as f32) / 1000.0).chain([-1e30, f32::NEG_INFINITY, f32::NAN]).collect();
        for chunk in xs.chunks(16) {
            let mut x = [0f32; 16];
            x[..chunk.len()].copy_from_slice(chunk);
            let [mut narrow, mut wide] = [[0f32; 16]; 2];
            // Safety: AVX2, FMA and AVX-512F checked above.
            unsafe {
                for half in 0..2 {
                    let e = exp_nonpositive(_mm256_loadu_ps(x[half * 8..].as_ptr()));
                    _mm256_storeu_ps(narrow[half * 8..].as_mut_ptr(), e);
                }
                _mm512_storeu_ps(wide.as_mut_ptr(), exp_nonpositive_512(_mm512_loadu_ps(x.as_ptr())));
            }
            for (i, (a, b)) in narrow.iter().zip(&wide).enumerate() {
                assert!(a.to_bits() == b.to_bits(), "e^{}: {a} vs {b}", x[i]);
            }
        }
    }

    #[test]
    fn in_place_gives_the_same_bits() {
        if !available() {
            return;
        }
        for len in [1, 5, 8, 19, 64, 4099] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 53 % 31) as f32 - 15.0) * 0.7).collect();
            let mut y = vec![0f32; len];
            let mut z = x.clone();
            // Safety: available() above.
            unsafe {
                softmax_row(&x, &mut y);
                softmax_row_in_place(&mut z);
            }
            assert!(y.iter().zip(&z).all(|(a, b)| a.to_bits() == b.to_bits()), "len {len}");
        }
    }
}
