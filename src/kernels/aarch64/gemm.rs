//! The NEON micro-kernel of the matrix product (`crate::kernels::gemm`, which describes the
//! layout and the other architectures' kernels).

use crate::kernels::gemm::{MR, NR};
use std::arch::aarch64::*;

/// One `MR × NR` block of `M` plus `init` (row r of the block starts from `init[r]`): `up` is
/// one panel of `U` (c columns of `MR`), `rows` the first of its c rows of `NR` tiles, `stride`
/// apart. The first `height` rows of the block are stored at `out`, `ld` apart.
///
/// The 24 sums (6 rows of 4 registers of 4 lanes) are named registers, as in the x86-64
/// kernels: an array of them is kept in memory by the compiler. The 6 weights of a column come
/// in two registers (4 + 2 lanes) and each is used as a lane (`FMLA` by element), so that a
/// column costs 2 loads for 24 multiply-adds and no broadcasts: 24 sums, 4 row registers and
/// 2 weight registers fill 30 of the 32 vector registers.
///
/// Safety: `up` holds c·MR values, `rows` c rows of NR `stride` apart, and `out` has room for
/// `height` rows of NR values `ld` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_neon(
    up: &[f32],
    rows: &[f32],
    stride: usize,
    out: *mut f32,
    ld: usize,
    height: usize,
    init: &[f32; MR],
) {
    let c = up.len() / MR;
    debug_assert!(c == 0 || rows.len() >= (c - 1) * stride + NR);
    let i = |r: usize| vdupq_n_f32(init[r]);
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (i(0), i(1), i(2), i(3), i(4), i(5));
    let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5) = (a0, a1, a2, a3, a4, a5);
    let (mut c0, mut c1, mut c2, mut c3, mut c4, mut c5) = (a0, a1, a2, a3, a4, a5);
    let (mut d0, mut d1, mut d2, mut d3, mut d4, mut d5) = (a0, a1, a2, a3, a4, a5);
    let (mut u, mut v) = (up.as_ptr(), rows.as_ptr());
    for _ in 0..c {
        // Safety: column ci < c of the panel and row ci of `rows` (the caller's promise).
        unsafe {
            let (x0, x1, x2, x3) = (vld1q_f32(v), vld1q_f32(v.add(4)), vld1q_f32(v.add(8)), vld1q_f32(v.add(12)));
            let (lo, hi) = (vld1q_f32(u), vld1_f32(u.add(4)));
            macro_rules! row {
                ($a:ident, $b:ident, $c:ident, $d:ident, $fma:ident, $w:expr, $lane:literal) => {
                    $a = $fma::<$lane>($a, x0, $w);
                    $b = $fma::<$lane>($b, x1, $w);
                    $c = $fma::<$lane>($c, x2, $w);
                    $d = $fma::<$lane>($d, x3, $w);
                };
            }
            row!(a0, b0, c0, d0, vfmaq_laneq_f32, lo, 0);
            row!(a1, b1, c1, d1, vfmaq_laneq_f32, lo, 1);
            row!(a2, b2, c2, d2, vfmaq_laneq_f32, lo, 2);
            row!(a3, b3, c3, d3, vfmaq_laneq_f32, lo, 3);
            row!(a4, b4, c4, d4, vfmaq_lane_f32, hi, 0);
            row!(a5, b5, c5, d5, vfmaq_lane_f32, hi, 1);
            u = u.add(MR);
            v = v.add(stride);
        }
    }
    let sums =
        [[a0, b0, c0, d0], [a1, b1, c1, d1], [a2, b2, c2, d2], [a3, b3, c3, d3], [a4, b4, c4, d4], [a5, b5, c5, d5]];
    for (r, row) in sums.into_iter().enumerate().take(height) {
        for (j, s) in row.into_iter().enumerate() {
            // Safety: row r < height of the caller's output, NR values.
            unsafe { vst1q_f32(out.add(r * ld + 4 * j), s) };
        }
    }
}
