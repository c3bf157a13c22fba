//! The rows a direct convolution multiplies on the matrix kernel (`gemm`): for each block of
//! [`NR`] output pixels, one row of NR values per input channel and kernel tap, shifted (and
//! strided) to line up with the outputs. Used by `crate::ops::direct_conv`.

use super::gemm::NR;
use crate::kernels::Window;

/// For pixels `pixels` of each `h` × `w` plane of `x`, the 9 rows of NR values that a 3×3
/// kernel multiplies: row `9ci + 3dy + dx` holds plane ci shifted by (dy − 1, dx − 1), zero
/// outside the plane and past the block's pixels.
pub(crate) fn shifted_rows(x: &[f32], [h, w]: [usize; 2], pixels: std::ops::Range<usize>, buf: &mut [f32]) {
    for (plane, rows) in x.chunks_exact(h * w).zip(buf.chunks_exact_mut(9 * NR)) {
        rows.fill(0.0);
        // The block's pixels in stretches along image rows: (first lane, row, first column, length).
        let mut at = pixels.start;
        while at < pixels.end {
            let (py, px0) = (at / w, at % w);
            let len = (w - px0).min(pixels.end - at);
            let lane = at - pixels.start;
            for dy in 0..3 {
                let Some(yy) = (py + dy).checked_sub(1).filter(|&yy| yy < h) else { continue };
                let src = &plane[yy * w..][..w];
                for dx in 0..3 {
                    let row = &mut rows[(3 * dy + dx) * NR + lane..][..len];
                    for (j, v) in row.iter_mut().enumerate() {
                        if let Some(xx) = (px0 + j + dx).checked_sub(1).filter(|&xx| xx < w) {
                            *v = src[xx];
                        }
                    }
                }
            }
            at += len;
        }
    }
}

/// The input of a convolution zero-padded and split by phase of the stride, so that each kernel
/// tap reads a stretch of output pixels as one contiguous run. Phase (py, px) of an input
/// plane holds padded pixel (i·s + py, j·s + px) at (i, j); output pixel (oy, ox) then reads
/// tap (dy, dx) from phase (dy % s, dx % s) at (oy + dy / s, ox + dx / s).
///
/// Gathering with strided reads and bounds checks per value took longer than the products for
/// the teacher's 32-channel downsampler, and longer than tract's whole convolution. On 4×4
/// maps, whose stretches are 4 pixels long, copying from phases was slower than
/// [`shifted_rows`], so stride-1 3×3 windows gather directly.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phases {
    window: Window,
    /// Rows and columns of each phase.
    rows: usize,
    cols: usize,
}

impl Phases {
    pub(crate) fn new(g: Window, [h, w]: [usize; 2]) -> Self {
        let s = g.stride;
        let (rows, cols) = ((h + g.before[0] + g.after[0]).div_ceil(s), (w + g.before[1] + g.after[1]).div_ceil(s));
        Phases { window: g, rows, cols }
    }

    /// Floats per input plane.
    pub(crate) fn plane(&self) -> usize {
        self.window.stride * self.window.stride * self.rows * self.cols
    }

    /// `dst` ([`plane`](Phases::plane) floats) from the `h` × `w` plane `src`.
    pub(crate) fn fill(&self, src: &[f32], [h, w]: [usize; 2], dst: &mut [f32]) {
        let (s, [top, left]) = (self.window.stride, self.window.before);
        dst.fill(0.0);
        let size = self.rows * self.cols;
        for (y, row) in src.chunks_exact(w).take(h).enumerate() {
            let yy = y + top;
            // Padded column X = x + left goes to phase X % s, column X / s.
            let line = |px: usize| ((yy % s) * s + px) * size + (yy / s) * self.cols;
            if s == 2 {
                // Both phases in one pass over pairs of pixels (vectorized).
                let (lo, odd) = dst.split_at_mut(line(1));
                let even = &mut lo[line(0)..];
                // Pixel 2m goes to column m + left / 2 of phase left % 2, 2m + 1 to the other.
                let (first, second, a, b) = match left % 2 {
                    0 => (even, odd, left / 2, left / 2),
                    _ => (odd, even, left / 2, left / 2 + 1),
                };
                let pairs = w / 2;
                for ((pair, x0), x1) in row.chunks_exact(2).zip(&mut first[a..a + pairs]).zip(&mut second[b..b + pairs])
                {
                    *x0 = pair[0];
                    *x1 = pair[1];
                }
                if w % 2 == 1 {
                    first[a + pairs] = row[w - 1];
                }
                continue;
            }
            for (x, &v) in row.iter().enumerate() {
                let xx = x + left;
                dst[line(xx % s) + xx / s] = v;
            }
        }
    }

    /// For output pixels `pixels` of a map `ow` wide, the size² rows of NR values per input
    /// plane of `planes` that the window's taps multiply (row `size²·ci + size·dy + dx`), zero
    /// past the block's pixels.
    pub(crate) fn gather(&self, planes: &[f32], ow: usize, pixels: std::ops::Range<usize>, buf: &mut [f32]) {
        let (s, size, width) = (self.window.stride, self.window.size, pixels.len());
        for (plane, rows) in planes.chunks_exact(self.plane()).zip(buf.chunks_exact_mut(size * size * NR)) {
            // The block's pixels in stretches along output rows.
            let mut at = pixels.start;
            while at < pixels.end {
                let (oy, ox0) = (at / ow, at % ow);
                let len = (ow - ox0).min(pixels.end - at);
                let lane = at - pixels.start;
                for (tap, row) in rows.chunks_exact_mut(NR).enumerate() {
                    let (dy, dx) = (tap / size, tap % size);
                    let phase = ((dy % s) * s + dx % s) * self.rows * self.cols;
                    let from = phase + (oy + dy / s) * self.cols + ox0 + dx / s;
                    // Whole blocks and half blocks as constant-size copies (a call to memmove each
                    // otherwise).
                    match len {
                        NR => row.copy_from_slice(&plane[from..from + NR]),
                        8 => row[lane..lane + 8].copy_from_slice(&plane[from..from + 8]),
                        _ => row[lane..lane + len].copy_from_slice(&plane[from..from + len]),
                    }
                }
                at += len;
            }
            if width < NR {
                rows.chunks_exact_mut(NR).for_each(|row| row[width..].fill(0.0));
            }
        }
    }
}
