//! The element-wise steps of the Winograd tile transforms in NEON on 32-bit ARM, four values to a
//! register, in inline assembly: LLVM does not vectorize float arithmetic for armv7 NEON (which
//! flushes subnormals), so the portable loops would stay scalar. The transforms themselves are the
//! portable ones (`crate::kernels::portable::winograd`), run with these steps.

use crate::kernels::portable::winograd::{input_transform_in, output_transform_in, Plain, Steps};
use std::arch::asm;

/// [`Steps`] in NEON. Its value proves that the CPU has NEON ([`Neon::detect`]).
pub(crate) struct Neon(());

impl Neon {
    /// The NEON steps where the CPU has NEON with 32 double registers (`super::neon`).
    pub(crate) fn detect() -> Option<Neon> {
        super::neon().then_some(Neon(()))
    }
}

/// [`crate::kernels::portable::winograd::input_transform`], with NEON steps where the CPU has them.
pub(crate) fn input_transform(x: &[f32], dims: [usize; 4], channels: std::ops::Range<usize>, v: &mut [&mut [f32]]) {
    match Neon::detect() {
        Some(neon) => input_transform_in(&neon, x, dims, channels, v),
        None => input_transform_in(&Plain, x, dims, channels, v),
    }
}

/// [`crate::kernels::portable::winograd::output_transform`], with NEON steps where the CPU has them.
pub(crate) fn output_transform(
    m: &[f32],
    bias: &[f32],
    dims: [usize; 4],
    planes: std::ops::Range<usize>,
    y: &mut [f32],
) {
    match Neon::detect() {
        Some(neon) => output_transform_in(&neon, m, bias, dims, planes, y),
        None => output_transform_in(&Plain, m, bias, dims, planes, y),
    }
}

impl Steps for Neon {
    fn bt(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], [o0, o1, o2, o3]: [&mut [f32]; 4]) {
        let n = o0.len();
        assert!([p.len(), q.len(), r.len(), s.len(), o1.len(), o2.len(), o3.len()].iter().all(|&l| l >= n));
        let whole = n / 4;
        if whole > 0 {
            // Safety: NEON (`self`); 4·whole ≤ n values read from each input and written to each
            // output (the lengths above); only the named registers are touched.
            unsafe {
                asm!(
                    ".fpu neon",
                    "2:",
                    "vld1.32 {{d0-d1}}, [{p}]!",
                    "vld1.32 {{d2-d3}}, [{q}]!",
                    "vld1.32 {{d4-d5}}, [{r}]!",
                    "vld1.32 {{d6-d7}}, [{s}]!",
                    "vsub.f32 q8, q0, q2",
                    "vadd.f32 q9, q1, q2",
                    "vsub.f32 q10, q2, q1",
                    "vsub.f32 q11, q1, q3",
                    "vst1.32 {{d16-d17}}, [{o0}]!",
                    "vst1.32 {{d18-d19}}, [{o1}]!",
                    "vst1.32 {{d20-d21}}, [{o2}]!",
                    "vst1.32 {{d22-d23}}, [{o3}]!",
                    "subs {n}, {n}, #1",
                    "bne 2b",
                    p = inout(reg) p.as_ptr() => _,
                    q = inout(reg) q.as_ptr() => _,
                    r = inout(reg) r.as_ptr() => _,
                    s = inout(reg) s.as_ptr() => _,
                    o0 = inout(reg) o0.as_mut_ptr() => _,
                    o1 = inout(reg) o1.as_mut_ptr() => _,
                    o2 = inout(reg) o2.as_mut_ptr() => _,
                    o3 = inout(reg) o3.as_mut_ptr() => _,
                    n = inout(reg) whole => _,
                    out("d0") _, out("d1") _, out("d2") _, out("d3") _,
                    out("d4") _, out("d5") _, out("d6") _, out("d7") _,
                    out("d16") _, out("d17") _, out("d18") _, out("d19") _,
                    out("d20") _, out("d21") _, out("d22") _, out("d23") _,
                    options(nostack),
                );
            }
        }
        let at = 4 * whole;
        Plain.bt(&p[at..], &q[at..], &r[at..], &s[at..], [&mut o0[at..], &mut o1[at..], &mut o2[at..], &mut o3[at..]]);
    }

    fn at(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], [o0, o1]: [&mut [f32]; 2]) {
        let n = o0.len();
        assert!([p.len(), q.len(), r.len(), s.len(), o1.len()].iter().all(|&l| l >= n));
        let whole = n / 4;
        if whole > 0 {
            // Safety: as in `bt`.
            unsafe {
                asm!(
                    ".fpu neon",
                    "2:",
                    "vld1.32 {{d0-d1}}, [{p}]!",
                    "vld1.32 {{d2-d3}}, [{q}]!",
                    "vld1.32 {{d4-d5}}, [{r}]!",
                    "vld1.32 {{d6-d7}}, [{s}]!",
                    "vadd.f32 q8, q0, q1",
                    "vsub.f32 q9, q1, q2",
                    "vadd.f32 q8, q8, q2",
                    "vsub.f32 q9, q9, q3",
                    "vst1.32 {{d16-d17}}, [{o0}]!",
                    "vst1.32 {{d18-d19}}, [{o1}]!",
                    "subs {n}, {n}, #1",
                    "bne 2b",
                    p = inout(reg) p.as_ptr() => _,
                    q = inout(reg) q.as_ptr() => _,
                    r = inout(reg) r.as_ptr() => _,
                    s = inout(reg) s.as_ptr() => _,
                    o0 = inout(reg) o0.as_mut_ptr() => _,
                    o1 = inout(reg) o1.as_mut_ptr() => _,
                    n = inout(reg) whole => _,
                    out("d0") _, out("d1") _, out("d2") _, out("d3") _,
                    out("d4") _, out("d5") _, out("d6") _, out("d7") _,
                    out("d16") _, out("d17") _, out("d18") _, out("d19") _,
                    options(nostack),
                );
            }
        }
        let at = 4 * whole;
        Plain.at(&p[at..], &q[at..], &r[at..], &s[at..], [&mut o0[at..], &mut o1[at..]]);
    }

    fn at_pairs(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], beta: f32, out: &mut [f32]) {
        let n = out.len() / 2;
        assert!([p.len(), q.len(), r.len(), s.len()].iter().all(|&l| l >= n));
        let whole = n / 4;
        if whole > 0 {
            let beta = [beta];
            // Safety: as in `bt`; 8·whole ≤ 2n values written to `out`, interleaved by VST2.
            unsafe {
                asm!(
                    ".fpu neon",
                    "vld1.32 {{d8[]}}, [{beta}]",
                    "vmov d9, d8",
                    "2:",
                    "vld1.32 {{d0-d1}}, [{p}]!",
                    "vld1.32 {{d2-d3}}, [{q}]!",
                    "vld1.32 {{d4-d5}}, [{r}]!",
                    "vld1.32 {{d6-d7}}, [{s}]!",
                    "vadd.f32 q8, q0, q1",
                    "vsub.f32 q10, q1, q2",
                    "vadd.f32 q8, q8, q2",
                    "vsub.f32 q10, q10, q3",
                    "vadd.f32 q8, q8, q4",
                    "vadd.f32 q10, q10, q4",
                    // d16, d17 = first sums, d20, d21 = second: stored as pairs.
                    "vswp d17, d20",
                    "vst2.32 {{d16-d17}}, [{o}]!",
                    "vst2.32 {{d20-d21}}, [{o}]!",
                    "subs {n}, {n}, #1",
                    "bne 2b",
                    beta = in(reg) beta.as_ptr(),
                    p = inout(reg) p.as_ptr() => _,
                    q = inout(reg) q.as_ptr() => _,
                    r = inout(reg) r.as_ptr() => _,
                    s = inout(reg) s.as_ptr() => _,
                    o = inout(reg) out.as_mut_ptr() => _,
                    n = inout(reg) whole => _,
                    out("d0") _, out("d1") _, out("d2") _, out("d3") _,
                    out("d4") _, out("d5") _, out("d6") _, out("d7") _,
                    out("d8") _, out("d9") _,
                    out("d16") _, out("d17") _, out("d18") _, out("d19") _,
                    out("d20") _, out("d21") _,
                    options(nostack),
                );
            }
        }
        let at = 4 * whole;
        Plain.at_pairs(&p[at..], &q[at..], &r[at..], &s[at..], beta, &mut out[2 * at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    /// Each step against the plain loops, bit for bit, at lengths around the 4 lanes.
    #[test]
    fn steps_give_the_plain_loops_bits() {
        let Some(neon) = Neon::detect() else {
            eprintln!("no NEON here: nothing to run");
            return;
        };
        for n in [0, 1, 3, 4, 5, 8, 13, 33] {
            let ins: Vec<Vec<f32>> = (0..4).map(|i| random(n + 2, 40 + i)).collect();
            let (p, q, r, s) = (&ins[0][..], &ins[1][..], &ins[2][..], &ins[3][..]);
            let run4 = |steps: &dyn Fn([&mut [f32]; 4])| {
                let mut o = vec![vec![f32::NAN; n]; 4];
                let [a, b, c, d] = &mut o[..] else { unreachable!() };
                steps([a, b, c, d]);
                o
            };
            let want = run4(&|o| Plain.bt(p, q, r, s, o));
            assert_eq!(want, run4(&|o| neon.bt(p, q, r, s, o)), "bt, {n} values");
            let two = |f: &dyn Fn([&mut [f32]; 2])| {
                let mut o = vec![vec![f32::NAN; n]; 2];
                let [a, b] = &mut o[..] else { unreachable!() };
                f([a, b]);
                o
            };
            let want = two(&|o| Plain.at(p, q, r, s, o));
            assert_eq!(want, two(&|o| neon.at(p, q, r, s, o)), "at, {n} values");
            let (mut a, mut b) = (vec![f32::NAN; 2 * n], vec![f32::NAN; 2 * n]);
            Plain.at_pairs(p, q, r, s, 0.25, &mut a);
            neon.at_pairs(p, q, r, s, 0.25, &mut b);
            assert_eq!(a, b, "at_pairs, {n} values");
        }
    }
}
