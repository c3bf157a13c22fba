//! GELU on x86-64 with AVX2 and FMA, 8 lanes at a time, in place (why: `crate::ops::gelu`).
//!
//! - **Tanh form** (`0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`): since
//!   `(1 + tanh u) / 2 = 1 / (1 + e^(−2u))`, it is `x · s` with `s` that logistic, computed from
//!   `e = e^(−|2u|) ≤ 1` as `1 / (1 + e)` for `u ≥ 0` and `e / (1 + e)` below, so that no
//!   exponential overflows and the negative tail keeps its relative precision.
//! - **Erf form** (`0.5 · x · (1 + erf(x / √2))`): with `z = |x| / √2`, `1 + erf(±z)` is
//!   `2 − erfc(z)` or `erfc(z)`, and `erfc` is the Chebyshev fit of Press et al., *Numerical
//!   Recipes* §6.2 (relative error below 1.2e-7 for every `z ≥ 0`), again with one exponential
//!   of a non-positive argument.
//!
//! Both exponentials are `softmax`'s (`exp_nonpositive`, clamped at −87: where that clamp acts,
//! the exact value is below 1e-37 · |x|; the tanh form then gives 0). NaN stays NaN.

use std::arch::x86_64::*;

use super::softmax::exp_nonpositive;

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum GeluForm {
    /// The tanh approximation (GPT-2's, `approximate="tanh"` in torch).
    Tanh,
    /// The exact form, through erf.
    Erf,
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    super::softmax::available()
}

/// `y = GELU(y)` element by element, in place.
///
/// Safety: AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu_in_place(y: &mut [f32], form: GeluForm) {
    let mut chunks = y.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // Safety: 8 floats; AVX2 and FMA (the caller's).
        unsafe {
            let x = _mm256_loadu_ps(chunk.as_ptr());
            _mm256_storeu_ps(chunk.as_mut_ptr(), lanes(x, form));
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut lane = [0f32; 8];
        lane[..tail.len()].copy_from_slice(tail);
        // Safety: 8 floats; AVX2 and FMA (the caller's).
        unsafe { _mm256_storeu_ps(lane.as_mut_ptr(), lanes(_mm256_loadu_ps(lane.as_ptr()), form)) };
        let n = tail.len();
        tail.copy_from_slice(&lane[..n]);
    }
}

/// GELU of 8 lanes.
///
/// Safety: AVX2 and FMA.
#[inline(always)]
unsafe fn lanes(x: __m256, form: GeluForm) -> __m256 {
    unsafe {
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        match form {
            GeluForm::Tanh => {
                // 2u = 2√(2/π) · (x + 0.044715 · x³)
                let x2 = _mm256_mul_ps(x, x);
                let inner = _mm256_fmadd_ps(_mm256_mul_ps(x2, _mm256_set1_ps(0.044_715)), x, x);
                let two_u = _mm256_mul_ps(inner, _mm256_set1_ps((8.0 / std::f32::consts::PI).sqrt()));
                // e^(−|2u|)
                let e = exp_nonpositive(_mm256_or_ps(two_u, sign));
                let positive = _mm256_cmp_ps::<_CMP_GE_OQ>(two_u, zero);
                // Below −88 the clamped exponential would leave x · 1e-38, not 0 (and −∞ for
                // −∞, where the chain gives NaN); unordered keeps NaN's lanes.
                let alive = _mm256_cmp_ps::<_CMP_NLT_UQ>(two_u, _mm256_set1_ps(-88.0));
                let numerator = _mm256_and_ps(_mm256_blendv_ps(e, one, positive), alive);
                _mm256_mul_ps(x, _mm256_div_ps(numerator, _mm256_add_ps(one, e)))
            }
            GeluForm::Erf => {
                let z = _mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
                let t = _mm256_div_ps(one, _mm256_fmadd_ps(z, _mm256_set1_ps(0.5), one));
                // Horner's rule on the fit's nine coefficients, highest first.
                let mut p = _mm256_set1_ps(0.170_872_77);
                for c in [
                    -0.822_152_23_f64,
                    1.488_515_87,
                    -1.135_203_98,
                    0.278_868_07,
                    -0.186_288_06,
                    0.096_784_18,
                    0.374_091_96,
                    1.000_023_68,
                ] {
                    // The fit's coefficients as published; the nearest floats.
                    let c = c as f32;
                    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
                }
                // −z² − 1.26551223 + t · p
                let exponent = _mm256_fmadd_ps(t, p, _mm256_fnmadd_ps(z, z, _mm256_set1_ps(-1.265_512_2)));
                let erfc = _mm256_mul_ps(t, exp_nonpositive(exponent));
                let positive = _mm256_cmp_ps::<_CMP_GE_OQ>(x, zero);
                let factor = _mm256_blendv_ps(erfc, _mm256_sub_ps(_mm256_set1_ps(2.0), erfc), positive);
                _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5)), factor)
            }
        }
    }
}

/// GELU of one value in float64: what `crate::passes::gelu` compares a chain with, and the
/// tests' reference.
pub(crate) fn reference_value(x: f64, form: GeluForm) -> f64 {
    match form {
        GeluForm::Tanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
        // erf(z) by its Maclaurin series below 3, 1 − erfc by the continued fraction above
        // (both to double precision over the range tested).
        GeluForm::Erf => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
    }
}

fn erf(z: f64) -> f64 {
    let a = z.abs();
    let value = if a < 3.0 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc(a) = e^(−a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + 2/(a + …)))))
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    value.copysign(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_match_float64_over_the_range_and_at_the_edges() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        // A dense grid over [−12, 12], some large values, both zeros; 8001 values leave a tail
        // of one after the vectors.
        let mut x: Vec<f32> = (0..8001).map(|i| (i as f32 - 4000.0) * 0.003).collect();
        x.extend([-1e4, -100.0, -30.0, 30.0, 100.0, 1e4, 0.0, -0.0, 1e-30, -1e-30]);
        for form in [GeluForm::Tanh, GeluForm::Erf] {
            let mut y = x.clone();
            // Safety: `available` above.
            unsafe { gelu_in_place(&mut y, form) };
            for (&x, &y) in x.iter().zip(&y) {
                let want = reference_value(x as f64, form);
                let err = (y as f64 - want).abs();
                // Relative, but in the negative tail e^(−2u) takes the rounding of 2u (float
                // precision times |2u|) as its relative error: there, against |x|.
                assert!(err <= 1e-6 * want.abs() + 1e-9 * (x as f64).abs(), "{form:?}({x}) = {y}, want {want}");
            }
        }
        for form in [GeluForm::Tanh, GeluForm::Erf] {
            let mut nan = [f32::NAN; 3];
            // Safety: `available` above.
            unsafe { gelu_in_place(&mut nan, form) };
            assert!(nan.iter().all(|v| v.is_nan()), "{form:?}");
        }
        // Far in the negative tail the tanh form gives 0, not x · e^−87.
        let mut far = [-1e33f32, -f32::MAX];
        // Safety: `available` above.
        unsafe { gelu_in_place(&mut far, GeluForm::Tanh) };
        assert_eq!(far, [0.0; 2]);
    }
}
