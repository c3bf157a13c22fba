//! GroupNorm over one group: three passes (sum, centered sum of squares, normalize with the
//! affine), the sums in [`LANES`] partial sums so that they vectorize.

/// Partial sums, so that the sums vectorize (one float addition chain would not).
const LANES: usize = 16;

/// One group of one image (see [`crate::kernels::group_norm`]); inlined into each caller, so
/// that the x86-64 AVX2 build of it vectorizes 8 lanes wide.
#[inline(always)]
pub(crate) fn group(x: &[f32], y: &mut [f32], plane: usize, [recip, eps]: [f32; 2], gamma: &[f32], beta: &[f32]) {
    let mean = sum(x, |v| v) * recip;
    let var = sum(x, |v| (v - mean) * (v - mean)) / x.len() as f32;
    let inv = (var + eps).sqrt().recip();
    for (ch, (xc, yc)) in x.chunks_exact(plane).zip(y.chunks_exact_mut(plane)).enumerate() {
        let (gamma, beta) = (gamma[ch], beta[ch]);
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = (v - mean) * inv * gamma + beta;
        }
    }
}

/// Σ f(v) over `xs`, in [`LANES`] partial sums.
#[inline(always)]
fn sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f(v);
    }
    acc.iter().sum()
}
