//! The float16 micro-kernel of the matrix product (ARMv8.2 FP16 arithmetic: Cortex-A55, A76,
//! A78; the Pi 5 and Jetson Orin), and the rounding of a float32 operand to float16.
//!
//! Why: `FMLA` on 8 halves does twice the multiply-adds of `FMLA` on 4 floats for the same
//! instruction, so the products of a convolution take half the instructions of the float32
//! kernel (`super::gemm`). The sums are kept in float16 while the kernel runs over the input
//! channels and widened to float32 as the block is stored; see `docs/performance.md` for the
//! error against float32.
//!
//! Written in inline assembly: Rust's float16 vector types and intrinsics are not stable.

use crate::kernels::gemm::{MR, NR};
use half::f16;
use std::arch::asm;

/// The assembly that widens the two registers of one row of sums and stores it at `{out}`,
/// then steps `{out}` to the next row, and ends the stores after `{h}` rows.
macro_rules! store_row {
    ($lo:literal, $hi:literal) => {
        concat!(
            "fcvtl v4.4s, v",
            $lo,
            ".4h\n",
            "fcvtl2 v5.4s, v",
            $lo,
            ".8h\n",
            "fcvtl v6.4s, v",
            $hi,
            ".4h\n",
            "fcvtl2 v7.4s, v",
            $hi,
            ".8h\n",
            "st1 {{v4.4s, v5.4s, v6.4s, v7.4s}}, [{out}], {ld}\n",
            "subs {h}, {h}, #1\n",
            "b.eq 3f\n",
        )
    };
}

// The assembly is written for these.
const _: () = assert!(MR == 6 && NR == 16);

/// Output channels per block: two panels of the weights' packing ([`MR`] each).
pub(crate) const ROWS: usize = 2 * MR;

/// One `ROWS × NR` block of `M = U · V` in float32: `u0` and `u1` are two panels of `U` in the
/// packing of `crate::kernels::gemm::pack_weights`, in float16 (c columns of [`MR`] halves
/// each; `u1` may be `u0` again when only one panel is left), `rows` the first of c rows of
/// [`NR`] halves of `V`, `stride` halves apart. Row r of the block (r < `height` ≤ [`ROWS`];
/// rows 0–5 from `u0`, 6–11 from `u1`) goes to `out + r · ld`.
///
/// The 24 sums (12 rows of 2 registers of 8 halves) fill v8–v31. The loop takes two input
/// channels per turn: two columns of each panel (12 halves) come in two registers (8 + 4
/// halves), taken as lanes (`FMLA` by element, whose lane register must be one of v0–v15), and
/// the two rows of `V` in four more: 6 loads, 48 multiply-adds and the loop's 2 instructions,
/// 28 instructions per input channel.
///
/// Safety: the CPU has FP16 arithmetic ([`available`]); `u0` and `u1` hold c·MR halves, `rows`
/// c rows of NR halves `stride` apart, 1 ≤ `height` ≤ [`ROWS`], and `out` has room for `height`
/// rows of NR floats `ld` apart.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "fp16")]
pub(crate) unsafe fn block_f16(
    u0: *const f16,
    u1: *const f16,
    c: usize,
    rows: *const f16,
    stride: usize,
    out: *mut f32,
    ld: usize,
    height: usize,
) {
    debug_assert!((1..=ROWS).contains(&height));
    // Safety: the caller's promises; every load and store stays inside them.
    unsafe {
        asm!(
            "movi v8.16b, #0", "movi v9.16b, #0", "movi v10.16b, #0", "movi v11.16b, #0",
            "movi v12.16b, #0", "movi v13.16b, #0", "movi v14.16b, #0", "movi v15.16b, #0",
            "movi v16.16b, #0", "movi v17.16b, #0", "movi v18.16b, #0", "movi v19.16b, #0",
            "movi v20.16b, #0", "movi v21.16b, #0", "movi v22.16b, #0", "movi v23.16b, #0",
            "movi v24.16b, #0", "movi v25.16b, #0", "movi v26.16b, #0", "movi v27.16b, #0",
            "movi v28.16b, #0", "movi v29.16b, #0", "movi v30.16b, #0", "movi v31.16b, #0",
            // An odd input channel first, on its own; then two per turn.
            "tbz {c}, #0, 2f",
            "ldr d0, [{u0}], #8",
            "ldr s1, [{u0}], #4",
            "ldr d2, [{u1}], #8",
            "ldr s3, [{u1}], #4",
            "ld1 {{v4.8h, v5.8h}}, [{v}], {vs}",
            "fmla v8.8h, v4.8h, v0.h[0]", "fmla v9.8h, v5.8h, v0.h[0]",
            "fmla v10.8h, v4.8h, v0.h[1]", "fmla v11.8h, v5.8h, v0.h[1]",
            "fmla v12.8h, v4.8h, v0.h[2]", "fmla v13.8h, v5.8h, v0.h[2]",
            "fmla v14.8h, v4.8h, v0.h[3]", "fmla v15.8h, v5.8h, v0.h[3]",
            "fmla v16.8h, v4.8h, v1.h[0]", "fmla v17.8h, v5.8h, v1.h[0]",
            "fmla v18.8h, v4.8h, v1.h[1]", "fmla v19.8h, v5.8h, v1.h[1]",
            "fmla v20.8h, v4.8h, v2.h[0]", "fmla v21.8h, v5.8h, v2.h[0]",
            "fmla v22.8h, v4.8h, v2.h[1]", "fmla v23.8h, v5.8h, v2.h[1]",
            "fmla v24.8h, v4.8h, v2.h[2]", "fmla v25.8h, v5.8h, v2.h[2]",
            "fmla v26.8h, v4.8h, v2.h[3]", "fmla v27.8h, v5.8h, v2.h[3]",
            "fmla v28.8h, v4.8h, v3.h[0]", "fmla v29.8h, v5.8h, v3.h[0]",
            "fmla v30.8h, v4.8h, v3.h[1]", "fmla v31.8h, v5.8h, v3.h[1]",
            "2:",
            "lsr {c}, {c}, #1",
            "cbz {c}, 4f",
            "1:",
            // Two columns of each panel, 12 halves: lanes 0–7 and 8–11.
            "ldr q0, [{u0}], #16",
            "ldr d1, [{u0}], #8",
            "ldr q2, [{u1}], #16",
            "ldr d3, [{u1}], #8",
            "ld1 {{v4.8h, v5.8h}}, [{v}], {vs}",
            "ld1 {{v6.8h, v7.8h}}, [{v}], {vs}",
            "fmla v8.8h, v4.8h, v0.h[0]", "fmla v9.8h, v5.8h, v0.h[0]",
            "fmla v10.8h, v4.8h, v0.h[1]", "fmla v11.8h, v5.8h, v0.h[1]",
            "fmla v12.8h, v4.8h, v0.h[2]", "fmla v13.8h, v5.8h, v0.h[2]",
            "fmla v14.8h, v4.8h, v0.h[3]", "fmla v15.8h, v5.8h, v0.h[3]",
            "fmla v16.8h, v4.8h, v0.h[4]", "fmla v17.8h, v5.8h, v0.h[4]",
            "fmla v18.8h, v4.8h, v0.h[5]", "fmla v19.8h, v5.8h, v0.h[5]",
            "fmla v20.8h, v4.8h, v2.h[0]", "fmla v21.8h, v5.8h, v2.h[0]",
            "fmla v22.8h, v4.8h, v2.h[1]", "fmla v23.8h, v5.8h, v2.h[1]",
            "fmla v24.8h, v4.8h, v2.h[2]", "fmla v25.8h, v5.8h, v2.h[2]",
            "fmla v26.8h, v4.8h, v2.h[3]", "fmla v27.8h, v5.8h, v2.h[3]",
            "fmla v28.8h, v4.8h, v2.h[4]", "fmla v29.8h, v5.8h, v2.h[4]",
            "fmla v30.8h, v4.8h, v2.h[5]", "fmla v31.8h, v5.8h, v2.h[5]",
            "fmla v8.8h, v6.8h, v0.h[6]", "fmla v9.8h, v7.8h, v0.h[6]",
            "fmla v10.8h, v6.8h, v0.h[7]", "fmla v11.8h, v7.8h, v0.h[7]",
            "fmla v12.8h, v6.8h, v1.h[0]", "fmla v13.8h, v7.8h, v1.h[0]",
            "fmla v14.8h, v6.8h, v1.h[1]", "fmla v15.8h, v7.8h, v1.h[1]",
            "fmla v16.8h, v6.8h, v1.h[2]", "fmla v17.8h, v7.8h, v1.h[2]",
            "fmla v18.8h, v6.8h, v1.h[3]", "fmla v19.8h, v7.8h, v1.h[3]",
            "fmla v20.8h, v6.8h, v2.h[6]", "fmla v21.8h, v7.8h, v2.h[6]",
            "fmla v22.8h, v6.8h, v2.h[7]", "fmla v23.8h, v7.8h, v2.h[7]",
            "fmla v24.8h, v6.8h, v3.h[0]", "fmla v25.8h, v7.8h, v3.h[0]",
            "fmla v26.8h, v6.8h, v3.h[1]", "fmla v27.8h, v7.8h, v3.h[1]",
            "fmla v28.8h, v6.8h, v3.h[2]", "fmla v29.8h, v7.8h, v3.h[2]",
            "fmla v30.8h, v6.8h, v3.h[3]", "fmla v31.8h, v7.8h, v3.h[3]",
            "subs {c}, {c}, #1",
            "b.ne 1b",
            "4:",
            // Each row widened to float32 (4 registers of 4) and stored.
            store_row!(8, 9), store_row!(10, 11), store_row!(12, 13), store_row!(14, 15),
            store_row!(16, 17), store_row!(18, 19), store_row!(20, 21), store_row!(22, 23),
            store_row!(24, 25), store_row!(26, 27), store_row!(28, 29), store_row!(30, 31),
            "3:",
            c = inout(reg) c => _,
            u0 = inout(reg) u0 => _,
            u1 = inout(reg) u1 => _,
            v = inout(reg) rows => _,
            vs = in(reg) stride * 2,
            out = inout(reg) out => _,
            ld = in(reg) ld * 4,
            h = inout(reg) height => _,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _,
            out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            out("v24") _, out("v25") _, out("v26") _, out("v27") _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            options(nostack),
        );
    }
}

/// `dst[i] = src[i]` rounded to float16 (to nearest even, as `half::f16::from_f32`), 16 at a
/// time with `FCVTN`.
///
/// Safety: the CPU has FP16 arithmetic ([`available`]).
#[target_feature(enable = "fp16")]
pub(crate) unsafe fn narrow(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "narrow: lengths differ");
    let whole = src.len() / 16;
    if whole > 0 {
        // Safety: `whole` groups of 16 are inside both slices.
        unsafe {
            asm!(
                "1:",
                "ldp q0, q1, [{s}], #32",
                "ldp q2, q3, [{s}], #32",
                "fcvtn v0.4h, v0.4s",
                "fcvtn2 v0.8h, v1.4s",
                "fcvtn v2.4h, v2.4s",
                "fcvtn2 v2.8h, v3.4s",
                "stp q0, q2, [{d}], #32",
                "subs {n}, {n}, #1",
                "b.ne 1b",
                s = inout(reg) src.as_ptr() => _,
                d = inout(reg) dst.as_mut_ptr() => _,
                n = inout(reg) whole => _,
                out("v0") _, out("v1") _, out("v2") _, out("v3") _,
                options(nostack),
            );
        }
    }
    for (d, &s) in dst[whole * 16..].iter_mut().zip(&src[whole * 16..]) {
        *d = f16::from_f32(s);
    }
}

/// Whether this CPU has FP16 arithmetic (ARMv8.2 `FEAT_FP16`).
pub(crate) fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("fp16")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_rounds_as_half_does() {
        if !available() {
            eprintln!("no FP16 arithmetic here: nothing to run");
            return;
        }
        // Values that round both ways, ties, subnormals, overflow, and a tail past the 8s.
        let mut src: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.3371 + 1e-3 * i as f32).collect();
        src.extend([1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, 1e-6, -3e-7, 7e4, -1e5, 65504.0, 0.0, -0.0]);
        let want: Vec<f16> = src.iter().map(|&v| f16::from_f32(v)).collect();
        let mut got = vec![f16::NAN; src.len()];
        // Safety: `available`.
        unsafe { narrow(&src, &mut got) };
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
