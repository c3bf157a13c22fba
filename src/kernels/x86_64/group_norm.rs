//! GroupNorm over one group, built for AVX2: the portable kernel's partial sums and
//! normalization compiled 8 lanes wide.

/// [`crate::kernels::portable::group_norm::group`] built for AVX2.
///
/// Safety: the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn group_avx2(x: &[f32], y: &mut [f32], plane: usize, stats: [f32; 2], gamma: &[f32], beta: &[f32]) {
    crate::kernels::portable::group_norm::group(x, y, plane, stats, gamma, beta)
}
