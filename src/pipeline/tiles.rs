//! Overlapping windows of one size over a larger canvas, and the weights that blend their
//! outputs into a seamless whole: tiled decoding runs a decoder planned for one window shape
//! over latents of any size, so its memory is that of one window.
//!
//! Windows all have the same size (one fixed-shape plan serves them all), the first starts at
//! 0 and the last ends at the canvas edge, and the ones between are spread evenly, so every
//! overlap is at least the one asked for. A window's weight ramps linearly across each overlap
//! with a neighbour and is 1 elsewhere; the canvas is the weighted sum divided by the sum of
//! weights, so wherever windows agree the result is exactly their value.

/// The windows along one axis, in latent units.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spans {
    /// Each window's first position.
    starts: Vec<usize>,
    /// Window length (the axis length when one window covers it).
    size: usize,
}

impl Spans {
    /// Windows of `size` over `len` positions, neighbours overlapping by at least `overlap`
    /// (less than `size`).
    pub(crate) fn new(len: usize, size: usize, overlap: usize) -> Self {
        if len <= size {
            return Spans { starts: vec![0], size: len };
        }
        let overlap = overlap.min(size - 1);
        let stride = size - overlap;
        let count = (len - overlap).div_ceil(stride);
        let last = len - size;
        // Evenly spread: window k starts at round(k · last / (count − 1)).
        let starts = (0..count).map(|k| (k * last + (count - 1) / 2) / (count - 1)).collect();
        Spans { starts, size }
    }

    pub(crate) fn starts(&self) -> &[usize] {
        &self.starts
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Blend weight of position `u` (0..size·scale) of window `k`, the axis measured in units
    /// `scale` times finer than the windows' (pixels of a latent window).
    pub(crate) fn weight(&self, k: usize, u: usize, scale: usize) -> f32 {
        let size = (self.size * scale) as f32;
        let u = u as f32 + 0.5;
        // Across an overlap of length o the weight rises from 0 to 1 over its middle half: a
        // window's outermost pixels, which its zero padding disturbs most, do not count.
        let rise = |d: f32, o: f32| ((d - o / 4.0) / (o / 2.0)).clamp(0.0, 1.0);
        let mut w = 1.0f32;
        if k > 0 {
            let o = ((self.starts[k - 1] + self.size - self.starts[k]) * scale) as f32;
            w = w.min(rise(u, o));
        }
        if k + 1 < self.starts.len() {
            let o = ((self.starts[k] + self.size - self.starts[k + 1]) * scale) as f32;
            w = w.min(rise(size - u, o));
        }
        w
    }
}

/// A weighted sum of windows over a `[C, H, W]` canvas, normalized when read out.
pub(crate) struct Blend {
    shape: [usize; 3],
    sum: Vec<f32>,
    weight: Vec<f32>,
}

impl Blend {
    pub(crate) fn new(shape: [usize; 3]) -> Self {
        let [c, h, w] = shape;
        Blend { shape, sum: vec![0.0; c * h * w], weight: vec![0.0; h * w] }
    }

    /// Adds `window` (`[C, wy.len(), wx.len()]`, row-major) at `[top, left]`, weighted by
    /// `wy[y] · wx[x]`.
    pub(crate) fn add(&mut self, window: &[f32], [top, left]: [usize; 2], wy: &[f32], wx: &[f32]) {
        let [c, h, w] = self.shape;
        let (th, tw) = (wy.len(), wx.len());
        debug_assert_eq!(window.len(), c * th * tw);
        for (y, &fy) in wy.iter().enumerate() {
            let row = (top + y) * w + left;
            for (x, &fx) in wx.iter().enumerate() {
                self.weight[row + x] += fy * fx;
            }
            for ch in 0..c {
                let src = &window[(ch * th + y) * tw..][..tw];
                let dst = &mut self.sum[ch * h * w + row..][..tw];
                for ((d, &s), &fx) in dst.iter_mut().zip(src).zip(wx) {
                    *d += fy * fx * s;
                }
            }
        }
    }

    /// The canvas, `C·H·W` values: each position's weighted mean.
    pub(crate) fn finish(mut self) -> Vec<f32> {
        let plane = self.weight.len();
        for (i, v) in self.sum.iter_mut().enumerate() {
            *v /= self.weight[i % plane];
        }
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_axis_evenly_with_the_overlap_asked() {
        for len in 1..60 {
            for size in 1..20 {
                for overlap in 0..size {
                    let s = Spans::new(len, size, overlap);
                    let starts = s.starts();
                    assert_eq!(starts[0], 0);
                    assert_eq!(starts.last().unwrap() + s.size(), len, "len {len} size {size}");
                    for pair in starts.windows(2) {
                        let shared = pair[0] + s.size() - pair[1];
                        assert!(pair[1] > pair[0], "{starts:?}");
                        assert!(shared >= overlap, "len {len} size {size} overlap {overlap}: {starts:?}");
                    }
                    // No more windows than needed: one fewer could not keep the overlap.
                    if starts.len() > 1 {
                        let n = starts.len() - 1;
                        assert!((n - 1) * (s.size() - overlap) + s.size() < len, "{starts:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_position_has_weight() {
        for len in 1..40 {
            for size in 1..16 {
                for overlap in 0..size {
                    let s = Spans::new(len, size, overlap);
                    for scale in [1, 8] {
                        let mut sum = vec![0f32; len * scale];
                        for (k, &start) in s.starts().iter().enumerate() {
                            for u in 0..s.size() * scale {
                                sum[start * scale + u] += s.weight(k, u, scale);
                            }
                        }
                        assert!(sum.iter().all(|&w| w > 0.0), "len {len} size {size} overlap {overlap}: {sum:?}");
                    }
                }
            }
        }
    }

    /// A decoder that is the same function of each latent wherever it is (here 2× nearest
    /// upsampling of a smooth field) must come out of tiling unchanged.
    #[test]
    fn windows_that_agree_blend_to_the_whole() {
        let (h, w, scale) = (13usize, 21usize, 2usize);
        let latent = |y: usize, x: usize| (y as f32 * 0.37).sin() + (x as f32 * 0.21).cos();
        let whole: Vec<f32> =
            (0..h * scale * w * scale).map(|i| latent(i / (w * scale) / scale, i % (w * scale) / scale)).collect();
        let (sy, sx) = (Spans::new(h, 5, 2), Spans::new(w, 6, 1));
        let mut blend = Blend::new([1, h * scale, w * scale]);
        for (ky, &top) in sy.starts().iter().enumerate() {
            for (kx, &left) in sx.starts().iter().enumerate() {
                let wy: Vec<f32> = (0..sy.size() * scale).map(|u| sy.weight(ky, u, scale)).collect();
                let wx: Vec<f32> = (0..sx.size() * scale).map(|u| sx.weight(kx, u, scale)).collect();
                let window: Vec<f32> = (0..wy.len() * wx.len())
                    .map(|i| latent(top + i / wx.len() / scale, left + i % wx.len() / scale))
                    .collect();
                blend.add(&window, [top * scale, left * scale], &wy, &wx);
            }
        }
        let out = blend.finish();
        for (i, (a, b)) in out.iter().zip(&whole).enumerate() {
            assert!((a - b).abs() < 1e-5, "pixel {i}: {a} against {b}");
        }
    }

    /// Windows that disagree by a constant each (a decoder whose normalization sees only its
    /// window) meet without a jump: neighbouring pixels differ by at most the offsets' spread
    /// over the ramp's length.
    #[test]
    fn disagreeing_windows_meet_without_a_seam() {
        let (len, size, overlap, scale) = (40usize, 12usize, 3usize, 8usize);
        let s = Spans::new(len, size, overlap);
        let mut blend = Blend::new([1, 1, len * scale]);
        for (k, &start) in s.starts().iter().enumerate() {
            let wx: Vec<f32> = (0..size * scale).map(|u| s.weight(k, u, scale)).collect();
            let offset = if k % 2 == 0 { 1.0 } else { -1.0 };
            blend.add(&vec![offset; size * scale], [0, start * scale], &[1.0], &wx);
        }
        let out = blend.finish();
        // The weights rise over half of each overlap.
        let ramp = (overlap * scale) as f32 / 2.0;
        for pair in out.windows(2) {
            assert!((pair[1] - pair[0]).abs() <= 2.0 / ramp + 1e-5, "a jump of {}", pair[1] - pair[0]);
        }
        assert!(out.iter().all(|v| v.abs() <= 1.0 + 1e-6));
    }
}
