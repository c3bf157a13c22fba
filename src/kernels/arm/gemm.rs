//! The NEON micro-kernel of the matrix product on 32-bit ARM (`crate::kernels::gemm`, which
//! describes the layout and the other architectures' kernels).
//!
//! armv7 has 16 quad registers, too few for the 6 × 16 block of the aarch64 kernel (24 sums), so
//! a block is two passes of 6 × 8 over the same panel of weights: 12 sums in q4–q15, one row of 8
//! values of `V` in q2–q3, and the 6 weights of a column in d0–d2, each used as a scalar
//! (`VMLA` by scalar, whose scalar must lie in d0–d15). A column costs 2 loads for 12
//! multiply-adds.
//!
//! `VMLA` rounds the product before it adds it (armv7 NEON has no fused multiply-add by scalar),
//! and NEON flushes subnormal numbers to zero: the sums differ from the fused x86-64 and aarch64
//! kernels' in their last bits.

use crate::kernels::gemm::{MR, NR};
use std::arch::asm;

/// Columns of `V` per pass.
const HALF: usize = NR / 2;

/// One `MR × NR` block of `M` plus `init` (row r of the block starts from `init[r]`): `up` is
/// one panel of `U` (c columns of `MR`), `rows` the first of its c rows of `NR` tiles, `stride`
/// apart. The first `height` rows of the block are stored at `out`, `ld` apart.
///
/// Safety: the CPU has NEON with 32 double registers (`super::neon`); `up` holds c·MR values,
/// `rows` c rows of NR `stride` apart, and `out` has room for `height` rows of NR values `ld`
/// apart.
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
    debug_assert!(height <= MR);
    let block = |dst: *mut f32, dst_ld: usize| {
        for half in 0..2 {
            // Safety: the caller's promises; each pass reads HALF of the NR values of each row
            // and writes HALF of the NR values of each of MR rows of `dst`.
            unsafe {
                half_block(up.as_ptr(), c, rows.as_ptr().add(half * HALF), stride, dst.add(half * HALF), dst_ld, init)
            };
        }
    };
    if height == MR {
        return block(out, ld);
    }
    // A block of fewer rows goes through `buf` (MR rows of NR), then its first rows to `out`:
    // only then is a buffer zeroed.
    let mut buf = [0f32; MR * NR];
    block(buf.as_mut_ptr(), NR);
    for r in 0..height {
        // Safety: row r < height of the caller's output, NR values.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(r * NR), out.add(r * ld), NR) };
    }
}

/// `MR` rows of [`HALF`] columns: `dst[r][j] = init[r] + Σ_ci u[ci][r] · v[ci][j]`, with `u`
/// c columns of MR values, `v` c rows of HALF values `stride` apart, `dst` MR rows `ld` apart.
///
/// Safety: NEON with 32 double registers; the pointers hold what is described above.
unsafe fn half_block(
    u: *const f32,
    c: usize,
    v: *const f32,
    stride: usize,
    dst: *mut f32,
    ld: usize,
    init: &[f32; MR],
) {
    // Safety: the caller's; the assembly reads c·MR values from `u`, c rows of HALF from `v`,
    // MR values from `init`, writes MR rows of HALF at `dst`, and touches only the registers
    // named below (d8–d15 are callee-saved: the compiler saves them).
    unsafe {
        asm!(
            ".fpu neon",
            "vld1.32 {{d0-d2}}, [{init}]",
            "vdup.32 q4, d0[0]",
            "vdup.32 q5, d0[0]",
            "vdup.32 q6, d0[1]",
            "vdup.32 q7, d0[1]",
            "vdup.32 q8, d1[0]",
            "vdup.32 q9, d1[0]",
            "vdup.32 q10, d1[1]",
            "vdup.32 q11, d1[1]",
            "vdup.32 q12, d2[0]",
            "vdup.32 q13, d2[0]",
            "vdup.32 q14, d2[1]",
            "vdup.32 q15, d2[1]",
            "cmp {c}, #0",
            "beq 3f",
            "2:",
            "vld1.32 {{d0-d2}}, [{u}]!",
            "vld1.32 {{d4-d7}}, [{v}], {stride}",
            "vmla.f32 q4, q2, d0[0]",
            "vmla.f32 q5, q3, d0[0]",
            "vmla.f32 q6, q2, d0[1]",
            "vmla.f32 q7, q3, d0[1]",
            "vmla.f32 q8, q2, d1[0]",
            "vmla.f32 q9, q3, d1[0]",
            "vmla.f32 q10, q2, d1[1]",
            "vmla.f32 q11, q3, d1[1]",
            "vmla.f32 q12, q2, d2[0]",
            "vmla.f32 q13, q3, d2[0]",
            "vmla.f32 q14, q2, d2[1]",
            "vmla.f32 q15, q3, d2[1]",
            "subs {c}, {c}, #1",
            "bne 2b",
            "3:",
            "vst1.32 {{d8-d11}}, [{dst}], {ld}",
            "vst1.32 {{d12-d15}}, [{dst}], {ld}",
            "vst1.32 {{d16-d19}}, [{dst}], {ld}",
            "vst1.32 {{d20-d23}}, [{dst}], {ld}",
            "vst1.32 {{d24-d27}}, [{dst}], {ld}",
            "vst1.32 {{d28-d31}}, [{dst}], {ld}",
            init = in(reg) init.as_ptr(),
            u = inout(reg) u => _,
            v = inout(reg) v => _,
            c = inout(reg) c => _,
            stride = in(reg) stride * 4,
            dst = inout(reg) dst => _,
            ld = in(reg) ld * 4,
            out("d0") _, out("d1") _, out("d2") _, out("d3") _,
            out("d4") _, out("d5") _, out("d6") _, out("d7") _,
            out("d8") _, out("d9") _, out("d10") _, out("d11") _,
            out("d12") _, out("d13") _, out("d14") _, out("d15") _,
            out("d16") _, out("d17") _, out("d18") _, out("d19") _,
            out("d20") _, out("d21") _, out("d22") _, out("d23") _,
            out("d24") _, out("d25") _, out("d26") _, out("d27") _,
            out("d28") _, out("d29") _, out("d30") _, out("d31") _,
            options(nostack),
        );
    }
}
