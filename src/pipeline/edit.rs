//! Editing an image rather than drawing one from noise: inpainting's mask (kept by blending
//! after every step, or given to an inpainting model as input channels) and MultiDiffusion's
//! windows over a canvas larger than the model.

use ndarray::{s, Array4, ArrayView4, ArrayViewMut4, Zip};

use super::tiles;
use crate::error::{Error, Result};

/// The windows of the model's size over a larger canvas, and their blend weights.
pub(super) struct Canvas {
    spans: [tiles::Spans; 2],
    weights: [Vec<Vec<f32>>; 2],
    /// One window's model input and output.
    input: Array4<f32>,
    output: Array4<f32>,
}

impl Canvas {
    /// Windows `[h, w]` over the canvas `[C, H, W]`, overlapping by at least `overlap` pixels
    /// (`scale` pixels per canvas position).
    /// The model's input has `in_channels` (its output `c`).
    pub(super) fn new(
        [c, big_h, big_w]: [usize; 3],
        in_channels: usize,
        [h, w]: [usize; 2],
        overlap: usize,
        scale: usize,
    ) -> Result<Self> {
        if big_h < h || big_w < w {
            return Err(Error::config(
                "tile-overlap",
                format!(
                    "the canvas ({}x{} pixels) must be at least the model's size ({}x{}) in both directions",
                    big_w * scale,
                    big_h * scale,
                    w * scale,
                    h * scale
                ),
            ));
        }
        let o = overlap.div_ceil(scale);
        if o >= h.min(w) {
            return Err(Error::config(
                "tile-overlap",
                format!("expected less than the model's size, {} pixels, got {overlap}", h.min(w) * scale),
            ));
        }
        let spans = [tiles::Spans::new(big_h, h, o), tiles::Spans::new(big_w, w, o)];
        let weights = [0, 1].map(|a| {
            let s = &spans[a];
            (0..s.starts().len()).map(|k| (0..s.size()).map(|u| s.weight(k, u, 1)).collect()).collect()
        });
        Ok(Canvas { spans, weights, input: Array4::zeros((1, in_channels, h, w)), output: Array4::zeros((1, c, h, w)) })
    }
}

impl Canvas {
    /// Runs `predict` on every window of `input` (the model's input over the whole canvas) and
    /// writes the weighted mean of the windows' predictions into `out`.
    pub(super) fn predict(
        &mut self,
        input: &Array4<f32>,
        out: &mut Array4<f32>,
        mut predict: impl FnMut(&Array4<f32>, &mut Array4<f32>) -> Result<()>,
    ) -> Result<()> {
        let [c, big_h, big_w] = [out.shape()[1], out.shape()[2], out.shape()[3]];
        let [h, w] = [self.input.shape()[2], self.input.shape()[3]];
        let mut blend = tiles::Blend::new([c, big_h, big_w]);
        for (ky, &top) in self.spans[0].starts().iter().enumerate() {
            for (kx, &left) in self.spans[1].starts().iter().enumerate() {
                self.input.assign(&input.slice(s![.., .., top..top + h, left..left + w]));
                predict(&self.input, &mut self.output)?;
                let window = self.output.as_slice().expect("scratch arrays are contiguous");
                blend.add(window, [top, left], &self.weights[0][ky], &self.weights[1][kx]);
            }
        }
        out.as_slice_mut().expect("scratch arrays are contiguous").copy_from_slice(&blend.finish());
        Ok(())
    }
}

/// `from` with the part to regenerate (mask ≥ 0.5) set to zero, into `to` (one image each,
/// `[1, C, H, W]`; the mask `[1, 1, H, W]`), as diffusers blanks the masked image it gives an
/// inpainting model.
pub(super) fn blank_masked(mut to: ArrayViewMut4<f32>, from: ArrayView4<f32>, mask: ArrayView4<f32>) {
    let plane = mask.slice(s![0, 0, .., ..]);
    let mut to = to.slice_mut(s![0, .., .., ..]);
    for (mut t, f) in to.outer_iter_mut().zip(from.slice(s![0, .., .., ..]).outer_iter()) {
        Zip::from(&mut t).and(&f).and(&plane).for_each(|t, &v, &k| *t = if k >= 0.5 { 0.0 } else { v });
    }
}

/// An inpainting model's input after the sample's `c` channels: the mask, then the masked init
/// (`masked`, or else `init` blanked where the mask says).
pub(super) fn fill_inpaint_input(
    input: &mut Array4<f32>,
    c: usize,
    mask: ArrayView4<f32>,
    masked: Option<ArrayView4<f32>>,
    init: &Array4<f32>,
) {
    input.slice_mut(s![.., c..c + 1, .., ..]).assign(&mask);
    let mut to = input.slice_mut(s![.., c + 1.., .., ..]);
    match masked {
        Some(m) => to.assign(&m),
        None => blank_masked(to, init.view(), mask),
    }
}

/// Inpainting by blending: `x ← (1 − m)·kept + m·x`, so that where the mask `m` is 0 the sample
/// is `kept` (one image; the mask `[1, 1, H, W]`).
pub(super) fn keep_unmasked(x: &mut Array4<f32>, kept: &Array4<f32>, mask: ArrayView4<f32>) {
    let plane = mask.slice(s![0, 0, .., ..]);
    let mut x = x.slice_mut(s![0, .., .., ..]);
    for (mut xc, kc) in x.outer_iter_mut().zip(kept.slice(s![0, .., .., ..]).outer_iter()) {
        Zip::from(&mut xc).and(&kc).and(&plane).for_each(|x, &k, &m| *x = (1.0 - m) * k + m * *x);
    }
}

/// `given` is `[1 or images, dims…]` (one for every image, or one each), else an error naming
/// `what` and the shape expected (`space` says whose shape that is).
pub(super) fn check_batch(what: &str, given: &Array4<f32>, dims: [usize; 3], images: usize, space: &str) -> Result<()> {
    let batch = given.shape()[0];
    if given.shape()[1..] == dims && (batch == 1 || batch == images) {
        return Ok(());
    }
    let [c, h, w] = dims;
    let batches = if images == 1 { "1".to_string() } else { format!("1 or {images}") };
    Err(Error::Tensor {
        what: what.into(),
        message: format!("expected shape [{batches}, {c}, {h}, {w}] ({space}), found {:?}", given.shape()),
    })
}

/// Image `i` of `batch` (`[1 or n, …]`): the only one, or the `i`-th.
pub(super) fn one_of(batch: &Array4<f32>, i: usize) -> ndarray::ArrayView4<'_, f32> {
    let at = if batch.shape()[0] == 1 { 0 } else { i };
    batch.slice(s![at..at + 1, .., .., ..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize) -> Array4<f32> {
        Array4::from_shape_fn((1, c, 2, 3), |(_, k, y, x)| (k * 6 + y * 3 + x) as f32 + 1.0)
    }

    #[test]
    fn the_mask_blanks_and_keeps_where_it_says() {
        let mask = Array4::from_shape_vec((1, 1, 2, 3), vec![0.0, 1.0, 0.5, 0.49, 1.0, 0.0]).unwrap();
        let init = ramp(2);
        let mut blanked = Array4::zeros((1, 2, 2, 3));
        blank_masked(blanked.view_mut(), init.view(), mask.view());
        assert_eq!(blanked.slice(s![0, 1, .., ..]), ndarray::arr2(&[[7.0, 0.0, 0.0], [10.0, 0.0, 12.0]]));

        let mut input = Array4::from_elem((1, 5, 2, 3), -1.0);
        fill_inpaint_input(&mut input, 2, mask.view(), None, &init);
        assert_eq!(input.slice(s![.., 2..3, .., ..]), mask);
        assert_eq!(input.slice(s![.., 3.., .., ..]), blanked);
        assert!(input.slice(s![.., ..2, .., ..]).iter().all(|&v| v == -1.0), "the sample's channels are left");

        let mut x = Array4::zeros((1, 2, 2, 3));
        keep_unmasked(&mut x, &init, mask.view());
        assert_eq!(x.slice(s![0, 0, .., ..]), ndarray::arr2(&[[1.0, 0.0, 1.5], [2.04, 0.0, 6.0]]));
    }
}
