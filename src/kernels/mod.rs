//! Kernels: the arithmetic of our operators on plain slices and pointers, one module per
//! architecture. No tract types here: the operators (`crate::ops`) unpack tensors, hand out the
//! work to threads, and call these.
//!
//! - `gemm`: the matrix product of the convolutions with constant, pre-packed weights, on x86-64,
//!   aarch64 and 32-bit ARM with NEON; its micro-kernels are in the architecture modules.
//!   `direct_conv` gathers the rows that a direct convolution multiplies on it.
//! - [`portable`]: plain Rust that the compiler vectorizes for any target (the Winograd tile
//!   transforms of the whole-map layout, the GroupNorm sums). aarch64 and 32-bit ARM run these.
//! - `x86_64`: AVX2+FMA and AVX-512 intrinsics: the matrix micro-kernels, the Winograd
//!   convolution in blocks of 16 tiles, the softmax rows, the GroupNorm built for AVX2, and the
//!   Linear and attention kernels.
//! - `aarch64`: NEON intrinsics: the matrix micro-kernel, the Winograd transforms and the
//!   softmax rows; and in inline assembly, the float16 micro-kernel for CPUs with FP16
//!   arithmetic.
//! - `arm` (32-bit, armv7 with NEON): the matrix micro-kernel and the Winograd transforms'
//!   element-wise steps in inline assembly, chosen at run time where the CPU has NEON with 32
//!   double registers.

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
#[cfg(target_arch = "arm")]
pub(crate) mod arm;
#[cfg(own_gemm)]
pub(crate) mod direct_conv;
#[cfg(own_gemm)]
pub(crate) mod gemm;
pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

/// An operator's constant weights as a kernel reads them: float32, or float16 that the caller
/// widens block by block ([`Floats::widen`]) just before the float32 kernel runs over it, so
/// that only a block of them is ever held as float32.
#[derive(Clone, Copy)]
pub(crate) enum Floats<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl<'a> Floats<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Floats::F32(v) => v.len(),
            Floats::F16(v) => v.len(),
        }
    }

    /// The values in `range` as float32: borrowed, or widened into `buf` (F16C on x86-64,
    /// FCVTL on aarch64, where the CPU has them).
    pub(crate) fn widen<'b>(&self, range: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        use half::slice::HalfFloatSliceExt;
        match self {
            Floats::F32(v) => &v[range],
            Floats::F16(v) => {
                let src = &v[range];
                buf.resize(src.len(), 0.0);
                src.convert_to_f32_slice(buf);
                buf
            }
        }
    }
}

/// Where a square convolution window goes over the map: its side, its stride (the same along
/// both axes), and the zeros padded before (top, left) and after (bottom, right) the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Window {
    pub size: usize,
    pub stride: usize,
    pub before: [usize; 2],
    pub after: [usize; 2],
}

impl Window {
    /// A `size` × `size` window at stride 1, padded by `pad` on every side.
    pub(crate) const fn square(size: usize, pad: usize) -> Self {
        Window { size, stride: 1, before: [pad; 2], after: [pad; 2] }
    }

    /// The output map over an `h` × `w` input, `None` when the window does not fit in the padded map.
    pub(crate) fn output(&self, [h, w]: [usize; 2]) -> Option<[usize; 2]> {
        let along = |len: usize, axis: usize| -> Option<usize> {
            let padded = len + self.before[axis] + self.after[axis];
            Some(padded.checked_sub(self.size)? / self.stride + 1)
        };
        Some([along(h, 0)?, along(w, 1)?])
    }
}

/// `0..len` in `parts` nearly equal ranges (fewer when `len` is small).
pub(crate) fn split(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    (0..parts).map(|i| i * len / parts..(i + 1) * len / parts).collect()
}

/// `rest` cut into consecutive pieces of the given lengths.
pub(crate) fn carve(mut rest: &mut [f32], lens: impl IntoIterator<Item = usize>) -> Vec<&mut [f32]> {
    lens.into_iter()
        .map(|len| {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            piece
        })
        .collect()
}

/// `y = (x − mean) / sqrt(var + eps) · γ + β` over one group of one image: `x`, `y` its
/// channels' planes of `plane` values each, `gamma` and `beta` one value per channel of the
/// group; mean = Σx · `recip`, var = Σ(x − mean)² / `x.len()`.
pub(crate) fn group_norm(x: &[f32], y: &mut [f32], plane: usize, [recip, eps]: [f32; 2], gamma: &[f32], beta: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // Safety: the CPU has AVX2.
        return unsafe { x86_64::group_norm::group_avx2(x, y, plane, [recip, eps], gamma, beta) };
    }
    portable::group_norm::group(x, y, plane, [recip, eps], gamma, beta)
}

/// Whether this CPU runs our softmax row kernel: x86-64 with AVX2 and FMA, and aarch64.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn softmax_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86_64::softmax::available();
    #[cfg(target_arch = "aarch64")]
    true
}

/// `y = softmax(y)` over one row, in place.
///
/// Safety: [`softmax_available`] (the operator asks once per call, not once per row).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) unsafe fn softmax_row_in_place(y: &mut [f32]) {
    // Safety: on x86-64 the CPU has AVX2 and FMA (the caller's promise).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86_64::softmax::softmax_row_in_place(y);
    }
    #[cfg(target_arch = "aarch64")]
    aarch64::softmax::softmax_row_in_place(y);
}

/// Whether this CPU multiplies in float16 on our kernel (`gemm::product_f16`): aarch64 with
/// FP16 arithmetic.
pub(crate) fn half_products() -> bool {
    #[cfg(target_arch = "aarch64")]
    return gemm::half_available();
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// Test data and float64 references shared by the kernel and operator tests.
/// Names the kernels this process packs weights for, e.g. `x86_64-avx512`: a plan file written
/// for other kernels (another CPU, `EDGE_DIFFUSE_X86_KERNEL`) is never read.
pub(crate) fn tag() -> String {
    #[cfg(own_gemm)]
    if gemm::available() {
        return format!("{}-{:?}", std::env::consts::ARCH, gemm::Kernel::detect()).to_lowercase();
    }
    format!("{}-plain", std::env::consts::ARCH)
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod softmax_tests {
    use super::{softmax_available, softmax_row_in_place};

    fn reference(x: &[f32]) -> Vec<f64> {
        let max = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    fn softmax(x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        // Safety: the tests ask `softmax_available` first.
        unsafe { softmax_row_in_place(&mut y) };
        y
    }

    #[test]
    fn rows_match_a_float64_softmax() {
        if !softmax_available() {
            eprintln!("no softmax kernel for this CPU: nothing to run");
            return;
        }
        // Lengths around the lanes of x86-64 (8) and aarch64 (2 × 4); values over a wide range.
        for len in [1, 3, 4, 7, 8, 13, 64, 100] {
            for scale in [0.01f32, 1.0, 30.0, 200.0] {
                let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 19) as f32 - 9.0) * scale).collect();
                for (i, (&got, want)) in softmax(&x).iter().zip(reference(&x)).enumerate() {
                    assert!(
                        (got as f64 - want).abs() < 2e-7 + 1e-6 * want,
                        "len {len} scale {scale} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn short_rows_with_huge_values_and_rows_with_nan_or_infinity() {
        if !softmax_available() {
            return;
        }
        // A maximum so large that max − 1e4 rounds to max: the tail's padding must not count.
        let y = softmax(&[1e12, 0.0, 0.0]);
        assert!(y[0] == 1.0 && y[1] < 1e-30 && y[2] < 1e-30, "{y:?}");
        let masked = softmax(&[f32::MIN; 3]);
        assert!(masked.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-7), "{masked:?}");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for len in [3, 24] {
                let mut x = vec![0.5f32; len];
                x[len / 2] = bad;
                if bad == f32::NEG_INFINITY {
                    x.fill(bad);
                }
                let y = softmax(&x);
                assert!(y.iter().all(|v| v.is_nan()), "{bad} in a row of {len}: {y:?}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Window;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0).collect()
    }

    /// The 3×3, padding-1 convolution in f64, the reference.
    pub(crate) fn direct(x: &[f32], kernel: &[f32], bias: &[f32], dims: [usize; 4], k: usize) -> Vec<f64> {
        direct_window(x, kernel, bias, dims, k, Window::square(3, 1))
    }

    /// A float64 convolution of `x` `[n, c, h, w]` with OIHW `kernel` over any window.
    pub(crate) fn direct_window(
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
        [n, c, h, w]: [usize; 4],
        k: usize,
        g: Window,
    ) -> Vec<f64> {
        let [oh, ow] = g.output([h, w]).expect("the window fits");
        let s = g.size;
        let mut y = vec![0f64; n * k * oh * ow];
        let outputs = (0..n).flat_map(|b| {
            (0..k).flat_map(move |ko| (0..oh).flat_map(move |oy| (0..ow).map(move |ox| (b, ko, oy, ox))))
        });
        for (b, ko, oy, ox) in outputs {
            let mut acc = bias[ko] as f64;
            let taps = (0..c).flat_map(|ci| (0..s).flat_map(move |dy| (0..s).map(move |dx| (ci, dy, dx))));
            for (ci, dy, dx) in taps {
                let yy = (oy * g.stride + dy) as isize - g.before[0] as isize;
                let xx = (ox * g.stride + dx) as isize - g.before[1] as isize;
                if (0..h as isize).contains(&yy) && (0..w as isize).contains(&xx) {
                    let v = x[((b * c + ci) * h + yy as usize) * w + xx as usize] as f64;
                    acc += v * kernel[((ko * c + ci) * s + dy) * s + dx] as f64;
                }
            }
            y[((b * k + ko) * oh + oy) * ow + ox] = acc;
        }
        y
    }

    /// Deterministic values in [-1, 1) (the direct-convolution tests').
    #[cfg(own_gemm)]
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }
}
