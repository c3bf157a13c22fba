//! Softmax over one row in NEON: the x86-64 kernel's algorithm (`crate::kernels::x86_64::softmax`,
//! whose docs give the exponential's derivation), 4 lanes wide, two vectors per turn, in place.

use std::arch::aarch64::*;

/// `e^x` in each lane, for `x ≤ 0`: `2^n · e^r`, `e^r` by its Taylor series to degree 7, `ln 2`
/// in two parts (Cody & Waite), the argument clamped at −87. NaN in, NaN out.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: float32x4_t) -> float32x4_t {
    // Safety: NEON is part of the aarch64 base instruction set; no memory is touched.
    unsafe {
        // FMAX returns NaN when either operand is NaN, so a NaN score spreads to its row.
        let x = vmaxq_f32(vdupq_n_f32(-87.0), x);
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
        let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4));
        let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
        let mut p = vdupq_n_f32(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let bits = vshlq_n_s32::<23>(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(p, vreinterpretq_f32_s32(bits))
    }
}

/// `y = softmax(y)` for one row, in place (why in place: `crate::ops::softmax`). A row holding
/// NaN or ±∞ comes out all NaN.
pub(crate) fn softmax_row_in_place(y: &mut [f32]) {
    let len = y.len();
    let whole = len / 8 * 8;
    let rest = len - whole;
    let p = y.as_mut_ptr();
    // Safety: NEON is baseline; every vector access is inside the first `whole ≤ len` floats,
    // the last `rest < 8` go through `tail`.
    unsafe {
        let (mut top0, mut top1) = (vdupq_n_f32(f32::NEG_INFINITY), vdupq_n_f32(f32::NEG_INFINITY));
        for at in (0..whole).step_by(8) {
            top0 = vmaxq_f32(top0, vld1q_f32(p.add(at)));
            top1 = vmaxq_f32(top1, vld1q_f32(p.add(at + 4)));
        }
        let mut tail = [0f32; 8];
        tail[..rest].copy_from_slice(&y[whole..]);
        let max = tail[..rest].iter().fold(vmaxvq_f32(vmaxq_f32(top0, top1)), |a, &b| a.max(b));
        let m = vdupq_n_f32(max);
        let (mut sum0, mut sum1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for at in (0..whole).step_by(8) {
            let e0 = exp_nonpositive(vsubq_f32(vld1q_f32(p.add(at)), m));
            let e1 = exp_nonpositive(vsubq_f32(vld1q_f32(p.add(at + 4)), m));
            vst1q_f32(p.add(at), e0);
            vst1q_f32(p.add(at + 4), e1);
            sum0 = vaddq_f32(sum0, e0);
            sum1 = vaddq_f32(sum1, e1);
        }
        if rest > 0 {
            // The padding lanes hold the maximum and are zeroed before the sum: a huge maximum
            // minus a smaller one could round to any value.
            tail[rest..].fill(max);
            let t = tail.as_mut_ptr();
            vst1q_f32(t, exp_nonpositive(vsubq_f32(vld1q_f32(t), m)));
            vst1q_f32(t.add(4), exp_nonpositive(vsubq_f32(vld1q_f32(t.add(4)), m)));
            tail[rest..].fill(0.0);
            y[whole..].copy_from_slice(&tail[..rest]);
            sum0 = vaddq_f32(sum0, vld1q_f32(t));
            sum1 = vaddq_f32(sum1, vld1q_f32(t.add(4)));
        }
        let scale = 1.0 / vaddvq_f32(vaddq_f32(sum0, sum1));
        let s = vdupq_n_f32(scale);
        for at in (0..whole).step_by(8) {
            vst1q_f32(p.add(at), vmulq_f32(vld1q_f32(p.add(at)), s));
            vst1q_f32(p.add(at + 4), vmulq_f32(vld1q_f32(p.add(at + 4)), s));
        }
        for v in &mut y[whole..] {
            *v *= scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_two_ulps() {
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let mut got = [0f32; 4];
            // Safety: 4 floats of room.
            unsafe { vst1q_f32(got.as_mut_ptr(), exp_nonpositive(vdupq_n_f32(x))) };
            let want = (x as f64).exp();
            assert!(((got[0] as f64 - want) / want).abs() < 2.5e-7, "e^{x}: {} vs {want}", got[0]);
        }
    }
}
