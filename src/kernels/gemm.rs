//! The matrix products of our convolutions: `M = U · V` with `U` (k × c, constant weights),
//! `V` (c × t, one row per input channel) and `M` (k × t), all small: k and c are 32–256
//! channels, t is 16–1024 tiles or pixels. Used for the 16 products of a Winograd convolution
//! (`crate::ops::winograd3x3`), for direct convolutions, 1×1 included (`crate::ops::direct_conv`),
//! and on x86-64 for attention's two products.
//!
//! Why our own: a general matrix product packs both operands on every call. Here `U` is
//! constant, so it is packed once at load ([`pack_weights`]), and `V` needs no packing at all:
//! the kernel reads rows of 16 columns straight from a block of it. With `matrixmultiply`,
//! packing took a noticeable share of a call; tract-linalg's kernels, fed packed operands, were
//! no faster (docs: optimizations).
//!
//! The micro-kernels, one picked per process ([`Kernel::detect`]), each in its architecture's
//! module; all keep a block of `M` in registers and add, for each input channel, one column of
//! `U` times one 16-value row of `V`, so that every sum adds the same products in the same
//! order, one fused multiply-add at a time, and all of them give the same bits:
//! - AVX2+FMA (x86-64) keeps a 6 × 16 block of `M` in 12 registers of 8 lanes;
//! - AVX-512 (x86-64) keeps up to a 30 × 16 block (five panels of `U`, [`MOST`]) in 30 of its 32
//!   registers of 16 lanes, so that each 16-value row of `V` it loads serves 30 products rather
//!   than 12. Up to five panels rather than two: the 35.7M UNet's 256-channel layers read `V`
//!   from L2 or L3 for every group of panels, so fewer groups made its step faster.
//! - NEON (aarch64) keeps a 6 × 16 block in 24 of its 32 registers of 4 lanes, and multiplies
//!   by the weights as lanes of two registers (`FMLA` by element), without broadcasting them.
//! - NEON on 32-bit ARM has 16 registers of 4 lanes: a 6 × 16 block is two passes of 6 × 8
//!   (12 sums), multiplying by scalars (`VMLA`). It is the one kernel whose bits differ: `VMLA`
//!   rounds each product before adding it, and NEON flushes subnormals to zero.
//!
//! On aarch64 with FP16 arithmetic, [`product_f16`] and `block_cols_f16` take the same layout in
//! float16 (weights and `V`) and sum in float16, two panels at a time (`--precision f16`).
//!
//! `EDGE_DIFFUSE_X86_KERNEL=avx2` keeps a CPU with AVX-512 on the AVX2 kernel (to compare them).

#[cfg(target_arch = "aarch64")]
use super::aarch64::gemm as aarch64;
#[cfg(target_arch = "aarch64")]
use super::aarch64::gemm_f16 as aarch64_f16;
#[cfg(target_arch = "arm")]
use super::arm::gemm as arm;
#[cfg(target_arch = "x86_64")]
use super::x86_64::gemm as x86_64;
#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

/// Output channels per block of the micro-kernel (rows of `M`).
pub(crate) const MR: usize = 6;
/// Tiles per block of the micro-kernel (columns of `M`).
pub(crate) const NR: usize = 16;

/// `U` (k × c, row-major) in the kernel's layout: panels of [`MR`] output channels, zero-padded,
/// each as `c` columns of `MR` values.
pub fn pack_weights(u: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut packed = vec![0f32; packed_len(k, c)];
    pack_strided(u, k, c, [c, 1], &mut packed);
    packed
}

/// [`pack_weights`] into `packed` ([`packed_len`] values, its padding zero), from a `U` whose
/// element (row, column) is at `u[row · strides[0] + column · strides[1]]`.
pub(crate) fn pack_strided(u: &[f32], k: usize, c: usize, strides: [usize; 2], packed: &mut [f32]) {
    if strides[0] == 1 && strides[1] != 1 && c > 0 {
        // Rows side by side in memory (attention's keys and values as tract lays them out): a
        // panel's rows of each column are neighbours, read together instead of a cache line
        // per value.
        for (p, panel) in packed[..packed_len(k, c)].chunks_exact_mut(c * MR).enumerate() {
            let (k0, rows) = (p * MR, MR.min(k - p * MR));
            for (ci, dst) in panel.chunks_exact_mut(MR).enumerate() {
                let src = &u[k0 + ci * strides[1]..][..rows];
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = if r < rows { src[r] } else { 0.0 };
                }
            }
        }
        return;
    }
    for ki in 0..k {
        let panel = &mut packed[(ki / MR) * c * MR..][..c * MR];
        for ci in 0..c {
            panel[ci * MR + ki % MR] = u[ki * strides[0] + ci * strides[1]];
        }
    }
}

/// Length of [`pack_weights`]' output.
pub fn packed_len(k: usize, c: usize) -> usize {
    k.div_ceil(MR) * c * MR
}

/// Whether this CPU runs one of the kernels: x86-64 with AVX2 and FMA, any aarch64 (NEON is
/// part of its base instruction set), or 32-bit ARM with NEON.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(target_arch = "aarch64")]
    return true;
    #[cfg(target_arch = "arm")]
    return super::arm::neon();
}

/// The micro-kernel this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    Neon,
}

impl Kernel {
    /// On x86-64, AVX-512 where the CPU has it, unless `EDGE_DIFFUSE_X86_KERNEL=avx2`; AVX2
    /// otherwise. Only meaningful where [`available`].
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            static KERNEL: OnceLock<Kernel> = OnceLock::new();
            *KERNEL.get_or_init(|| {
                let wanted = std::env::var("EDGE_DIFFUSE_X86_KERNEL").ok();
                if wanted.as_deref() != Some("avx2") && std::is_x86_feature_detected!("avx512f") {
                    Kernel::Avx512
                } else {
                    Kernel::Avx2
                }
            })
        }
        #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
        Kernel::Neon
    }

    /// Whether this CPU runs `self` (tests ask before running a kernel that is not detected).
    pub fn runs_here(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => available() && std::is_x86_feature_detected!("avx512f"),
            #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
            Kernel::Neon => available(),
        }
    }
}

/// Most panels a kernel takes at once: AVX-512 keeps 5 × 6 sums in 30 of its 32 registers.
pub(crate) const MOST: usize = 5;

/// How many of the next `left` panels `kernel` takes at once: one with AVX2 and NEON; with
/// AVX-512 up to [`MOST`], spread evenly (6 panels go as 3 + 3, not 5 + 1: a lone panel loads a
/// row of `V` for 6 products, 5 panels for 30).
pub(crate) fn at_once(kernel: Kernel, left: usize) -> usize {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => left.div_ceil(left.div_ceil(MOST).max(1)),
        #[allow(unreachable_patterns)] // only AVX-512 takes more than one
        _ => 1.min(left),
    }
}

/// One block of [`NR`] columns of `M` for the output-channel panels `panels` of `u` (from
/// [`pack_weights`] for `k` × `c`), each row starting from `init[row]` (0 with `None`):
/// `rows` holds c rows of NR values, `stride` apart; row `ki` of `M` (for `ki` in the panels and
/// below `k`) goes to `out + (ki − panels.start · MR) · ld`.
///
/// Safety: `kernel.runs_here()`; `u` holds the panels, `rows` c rows of NR `stride` apart,
/// `init` (when given) `k` values, and `out` room for every row stored.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block(
    kernel: Kernel,
    u: &[f32],
    [k, c]: [usize; 2],
    panels: std::ops::Range<usize>,
    rows: &[f32],
    stride: usize,
    out: *mut f32,
    ld: usize,
    init: Option<&[f32]>,
) {
    let start = panels.start;
    let mut p = start;
    while p < panels.end {
        let count = at_once(kernel, panels.end - p);
        let height = (count * MR).min(k - p * MR);
        let mut first = [0f32; MOST * MR];
        if let Some(init) = init {
            first[..height].copy_from_slice(&init[p * MR..][..height]);
        }
        // The panels are consecutive in `u`, c·MR values each.
        let up = &u[p * c * MR..][..count * c * MR];
        // Safety: the caller's promises, for these panels' rows.
        unsafe {
            let at = out.add((p - start) * MR * ld);
            match (kernel, count) {
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, 5) => x86_64::block_avx512::<5>(up, rows, stride, at, ld, height, &first),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, 4) => x86_64::block_avx512::<4>(up, rows, stride, at, ld, height, &first),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, 3) => x86_64::block_avx512::<3>(up, rows, stride, at, ld, height, &first),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, 2) => x86_64::block_avx512::<2>(up, rows, stride, at, ld, height, &first),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, _) => x86_64::block_avx512::<1>(up, rows, stride, at, ld, height, &first),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, _) => {
                    x86_64::block_avx2_fma(up, rows, stride, at, ld, height, first[..MR].try_into().expect("MR values"))
                }
                #[cfg(target_arch = "aarch64")]
                (Kernel::Neon, _) => {
                    aarch64::block_neon(up, rows, stride, at, ld, height, first[..MR].try_into().expect("MR values"))
                }
                #[cfg(target_arch = "arm")]
                (Kernel::Neon, _) => {
                    arm::block_neon(up, rows, stride, at, ld, height, first[..MR].try_into().expect("MR values"))
                }
            }
        }
        p += count;
    }
}

/// [`block`] for a block whose last columns are padding: only the first `width` ≤ [`NR`] values
/// of each row are stored (`rows` still holds whole rows of NR, zero-padded). A partial block
/// goes panel by panel through a stack buffer.
///
/// Safety: as [`block`], with room for `width` values in each row of `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_cols(
    kernel: Kernel,
    u: &[f32],
    [k, c]: [usize; 2],
    panels: std::ops::Range<usize>,
    rows: &[f32],
    stride: usize,
    width: usize,
    out: *mut f32,
    ld: usize,
    init: Option<&[f32]>,
) {
    debug_assert!(width <= NR);
    if width == NR {
        // Safety: the caller's.
        return unsafe { block(kernel, u, [k, c], panels, rows, stride, out, ld, init) };
    }
    for p in panels.clone() {
        let mut acc = [[0f32; NR]; MR];
        // Safety: the caller's, one panel into a whole MR × NR buffer; then `width` values of
        // each of its rows below k into the caller's rows.
        unsafe {
            block(kernel, u, [k, c], p..p + 1, rows, stride, acc.as_mut_ptr().cast(), NR, init);
            for (r, a) in acc.iter().enumerate().take(MR.min(k - p * MR)) {
                std::ptr::copy_nonoverlapping(a.as_ptr(), out.add(((p - panels.start) * MR + r) * ld), width);
            }
        }
    }
}

/// `m = u · v` on `kernel`: `u` from [`pack_weights`], `v` (c × t) and `m` (k × t) row-major.
/// Panics unless `kernel.runs_here()`.
pub fn product(kernel: Kernel, u: &[f32], v: &[f32], m: &mut [f32], [k, c, t]: [usize; 3]) {
    assert!(kernel.runs_here(), "product: this CPU cannot run {kernel:?}");
    assert!(u.len() >= packed_len(k, c) && v.len() >= c * t && m.len() >= k * t, "product: short operand");
    let panels = k.div_ceil(MR);
    let mut tail = Vec::new();
    for t0 in (0..t).step_by(NR) {
        let width = NR.min(t - t0);
        let (rows, stride) = columns(v, [c, t], t0, &mut tail);
        assert!(c == 0 || rows.len() >= (c - 1) * stride + NR, "product: short rows");
        // Safety: `runs_here`, the operand lengths above; `width` columns from t0 of the k rows
        // of m, t apart.
        unsafe { block_cols(kernel, u, [k, c], 0..panels, rows, stride, width, m[t0..].as_mut_ptr(), t, None) };
    }
}

/// The block of [`NR`] columns of `v` (c × t) from column `t0`, as c rows and their stride:
/// in `v` itself, or for the last, partial block a zero-padded copy of its columns in `tail`.
pub(crate) fn columns<'a, T: Copy + Default>(
    v: &'a [T],
    [c, t]: [usize; 2],
    t0: usize,
    tail: &'a mut Vec<T>,
) -> (&'a [T], usize) {
    let width = NR.min(t - t0);
    if width == NR {
        return (&v[t0..], t);
    }
    tail.clear();
    tail.resize(c * NR, T::default());
    for (dst, src) in tail.chunks_exact_mut(NR).zip(v.chunks_exact(t)) {
        dst[..width].copy_from_slice(&src[t0..t0 + width]);
    }
    (&tail[..], NR)
}

/// Whether this CPU runs [`product_f16`]: aarch64 with FP16 arithmetic.
#[cfg(target_arch = "aarch64")]
pub fn half_available() -> bool {
    aarch64_f16::available()
}

/// `m = u · v` with float16 products and sums, `m` widened to float32 as it is stored: `u` is
/// [`pack_weights`]' layout in float16, `v` (c × t) float16 and `m` (k × t) float32, row-major.
/// Panics unless [`half_available`].
#[cfg(target_arch = "aarch64")]
pub fn product_f16(u: &[half::f16], v: &[half::f16], m: &mut [f32], [k, c, t]: [usize; 3]) {
    assert!(half_available(), "product_f16: this CPU has no FP16 arithmetic");
    assert!(u.len() >= packed_len(k, c) && v.len() >= c * t && m.len() >= k * t, "product_f16: short operand");
    let mut tail = Vec::new();
    for t0 in (0..t).step_by(NR) {
        let width = NR.min(t - t0);
        let (rows, stride) = columns(v, [c, t], t0, &mut tail);
        assert!(c == 0 || rows.len() >= (c - 1) * stride + NR, "product_f16: short rows");
        // Safety: `half_available`; the operand lengths above; `width` columns from t0 of the
        // k rows of m, t apart.
        unsafe { block_cols_f16(u, [k, c], 0..k.div_ceil(MR), rows, stride, width, m[t0..].as_mut_ptr(), t, None) };
    }
}

/// [`block_cols`] with float16 products and sums (`u` in float16, `rows` c rows of NR halves
/// `stride` apart), two panels at a time (`crate::kernels::aarch64::gemm_f16`); `init` is
/// added to each row's float32 result.
///
/// Safety: [`half_available`]; otherwise as [`block_cols`].
#[cfg(target_arch = "aarch64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_cols_f16(
    u: &[half::f16],
    [k, c]: [usize; 2],
    panels: std::ops::Range<usize>,
    rows: &[half::f16],
    stride: usize,
    width: usize,
    out: *mut f32,
    ld: usize,
    init: Option<&[f32]>,
) {
    use aarch64_f16::{block_f16, ROWS};
    debug_assert!(width <= NR && (c == 0 || rows.len() >= (c - 1) * stride + NR));
    let mut buf = [0f32; ROWS * NR];
    let mut p = panels.start;
    while p < panels.end {
        let count = (panels.end - p).min(2);
        let u0 = &u[p * c * MR..][..c * MR];
        let u1 = if count == 2 { &u[(p + 1) * c * MR..][..c * MR] } else { u0 };
        let height = (k - p * MR).min(count * MR);
        // Safety: the caller's promises for these panels' rows; a block of whole rows goes
        // straight to `out`, a partial one through `buf` (ROWS × NR).
        unsafe {
            let at = out.add((p - panels.start) * MR * ld);
            let whole = width == NR;
            let (dst, dst_ld) = if whole { (at, ld) } else { (buf.as_mut_ptr(), NR) };
            block_f16(u0.as_ptr(), u1.as_ptr(), c, rows.as_ptr(), stride, dst, dst_ld, height);
            for r in 0..height {
                let row = std::slice::from_raw_parts_mut(at.add(r * ld), width);
                if !whole {
                    row.copy_from_slice(&buf[r * NR..][..width]);
                }
                if let Some(init) = init {
                    let first = init[p * MR + r];
                    row.iter_mut().for_each(|x| *x += first);
                }
            }
        }
        p += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel of this architecture.
    #[cfg(target_arch = "x86_64")]
    const EVERY: [Kernel; 2] = [Kernel::Avx2, Kernel::Avx512];
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    const EVERY: [Kernel; 1] = [Kernel::Neon];

    #[test]
    fn matches_a_plain_product() {
        if !available() {
            eprintln!("no kernel for this CPU: nothing to run");
            return;
        }
        // Sizes around the block edges: k not a multiple of 6 (an odd number of panels for the
        // AVX-512 pairs), t not a multiple of 16.
        for (k, c, t) in [(6, 1, 16), (32, 32, 256), (7, 5, 17), (13, 3, 5), (1, 9, 33), (19, 4, 16), (24, 2, 40)] {
            let u: Vec<f32> = (0..k * c).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
            let v: Vec<f32> = (0..c * t).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
            let mut m = vec![f32::NAN; k * t];
            product(Kernel::detect(), &pack_weights(&u, k, c), &v, &mut m, [k, c, t]);
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

    /// The float16 product against float64 sums of the float16-rounded operands: the sums in
    /// float16 lose about 2⁻¹¹ of the running sum per addition.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn half_product_matches_a_plain_product() {
        use half::f16;
        if !half_available() {
            eprintln!("no FP16 arithmetic here: the kernel cannot run");
            return;
        }
        // k off 12 and off 6 (a lone last panel), t off 16, c = 0 and 1, a large c.
        for (k, c, t) in
            [(12, 1, 16), (32, 32, 256), (7, 5, 17), (13, 3, 5), (1, 9, 33), (19, 4, 16), (24, 256, 40), (6, 0, 3)]
        {
            let u: Vec<f32> = (0..k * c).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
            let v: Vec<f32> = (0..c * t).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
            let uh: Vec<f16> = pack_weights(&u, k, c).iter().map(|&x| f16::from_f32(x)).collect();
            let vh: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let mut m = vec![f32::NAN; k * t + 5];
            product_f16(&uh, &vh, &mut m, [k, c, t]);
            for ki in 0..k {
                for ti in 0..t {
                    let terms = (0..c).map(|ci| f16::from_f32(u[ki * c + ci]).to_f64() * vh[ci * t + ti].to_f64());
                    let (want, size): (f64, f64) = terms.fold((0.0, 0.0), |(s, a), x| (s + x, a + x.abs()));
                    let got = m[ki * t + ti] as f64;
                    assert!(
                        (got - want).abs() <= 1e-3 * size * (c as f64).sqrt().max(1.0) + 1e-6,
                        "k{k} c{c} t{t} at ({ki},{ti}): {got} vs {want}"
                    );
                }
            }
            assert!(m[k * t..].iter().all(|x| x.is_nan()), "k{k} c{c} t{t}: wrote past m");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_kernels_give_the_same_bits() {
        if !Kernel::Avx512.runs_here() {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        for (k, c, t) in [(64, 64, 64), (19, 7, 33), (6, 3, 16), (128, 32, 20)] {
            let u: Vec<f32> = (0..k * c).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let v: Vec<f32> = (0..c * t).map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0).collect();
            let packed = pack_weights(&u, k, c);
            let [mut a, mut b] = [vec![f32::NAN; k * t], vec![f32::NAN; k * t]];
            product(Kernel::Avx2, &packed, &v, &mut a, [k, c, t]);
            product(Kernel::Avx512, &packed, &v, &mut b, [k, c, t]);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "k{k} c{c} t{t}");
        }
    }

    #[test]
    fn packing_reads_any_strides_alike() {
        // The same k × c matrix stored row-major and column-major (the column path), with
        // partial panels, and a stored column longer than k (a view into a larger tensor).
        for (k, c) in [(1, 1), (5, 3), (6, 7), (13, 4), (64, 19)] {
            let u: Vec<f32> = (0..k * c).map(|i| i as f32 * 0.5 - 3.0).collect();
            let ld = k + 3;
            let mut columns = vec![f32::NAN; ld * c];
            for (i, x) in u.iter().enumerate() {
                columns[(i % c) * ld + i / c] = *x;
            }
            let want = pack_weights(&u, k, c);
            let mut got = vec![f32::NAN; packed_len(k, c)];
            pack_strided(&columns, k, c, [1, ld], &mut got);
            assert_eq!(want, got, "{k} × {c}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panels_at_once_are_spread_evenly() {
        for left in 1..=40 {
            let mut counts = vec![];
            let mut rest = left;
            while rest > 0 {
                let n = at_once(Kernel::Avx512, rest);
                assert!((1..=MOST).contains(&n), "{left} panels: {n} at once");
                counts.push(n);
                rest -= n;
            }
            let (most, least) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
            assert!(most - least <= 1 && counts.len() == left.div_ceil(MOST), "{left} panels: {counts:?}");
            assert_eq!(at_once(Kernel::Avx2, left), 1);
        }
    }

    #[test]
    fn block_starts_from_init_and_stores_only_rows_below_k() {
        for kernel in EVERY {
            if !kernel.runs_here() {
                continue;
            }
            let (k, c) = (13, 4);
            let u: Vec<f32> = (0..k * c).map(|i| i as f32 / 8.0).collect();
            let v: Vec<f32> = (0..c * NR).map(|i| (i % 5) as f32).collect();
            let init: Vec<f32> = (0..k).map(|i| 100.0 * i as f32).collect();
            // Room for 3 panels (18 rows); rows 13.. must stay untouched.
            let mut out = vec![f32::NAN; 18 * NR];
            let packed = pack_weights(&u, k, c);
            // Safety: `runs_here`; 3 panels of c·MR, c rows of NR, 18 rows of room.
            unsafe { block(kernel, &packed, [k, c], 0..3, &v, NR, out.as_mut_ptr(), NR, Some(&init)) };
            for ki in 0..k {
                for ti in 0..NR {
                    let want = init[ki] + (0..c).map(|ci| u[ki * c + ci] * v[ci * NR + ti]).sum::<f32>();
                    assert!((out[ki * NR + ti] - want).abs() < 1e-3, "{kernel:?} ({ki},{ti})");
                }
            }
            assert!(out[k * NR..].iter().all(|x| x.is_nan()), "{kernel:?} wrote past k");
        }
    }
}
