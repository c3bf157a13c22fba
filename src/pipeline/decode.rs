//! Latents to pixels: the VAE decoder graph on `latents / scaling_factor + shift_factor`, as
//! diffusers decodes, on the whole latents or in overlapping windows (tiled decoding).

use ndarray::{s, Array4, ArrayD, IxDyn};

use super::tiles::{Blend, Spans};
use crate::card::ModelCard;
use crate::error::{Error, Result};
use crate::runtime::{Graph, PlanCache, PlanFile, WeightPrecision};

/// When the decoder works in windows of its tile size, blended where they overlap. Memory is
/// then that of one window whatever the image's size; the price is a little more work in the
/// overlaps, and an image not exactly equal to the whole one's (a VAE decoder's normalization
/// and attention see only the window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecoderTiling {
    /// Tiled when the latents exceed the tile size.
    #[default]
    Auto,
    /// Always tiled (at most the tile size per window).
    Always,
    /// Never tiled.
    Never,
}

impl std::str::FromStr for DecoderTiling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DecoderTiling::Auto),
            "on" => Ok(DecoderTiling::Always),
            "off" => Ok(DecoderTiling::Never),
            other => Err(Error::config("vae-tiling", format!("expected auto, on or off, got {other:?}"))),
        }
    }
}

pub(super) struct Decoder {
    graph: Graph,
    scaling: f32,
    shift: f32,
    /// Pixels per latent.
    scale: usize,
    /// `[C, H, W]` of one decoded image.
    shape: [usize; 3],
    /// The windows along the height and the width (one each when not tiled).
    spans: [Spans; 2],
    /// Each window's blend weights along each axis, per pixel.
    weights: [Vec<Vec<f32>>; 2],
    /// One window's latents, `[1, C, h, w]`.
    input: ArrayD<f32>,
}

impl Decoder {
    /// What became of the plan file of the graph's packed weights.
    pub(super) fn plan_file(&self) -> &PlanFile {
        self.graph.plan_file()
    }

    /// The card's decoder, its plan made for one window (`tile` pixels a side, default the
    /// card's `tile_size`) when tiled.
    pub(super) fn load(
        card: &ModelCard,
        tiling: DecoderTiling,
        tile: Option<usize>,
        threads: usize,
        plan_cache: &PlanCache,
        packed: WeightPrecision,
    ) -> Result<Option<Self>> {
        let Some(section) = &card.decoder else { return Ok(None) };
        let scale = section.scale;
        let tile = tile.unwrap_or(section.tile());
        if tile < scale {
            return Err(Error::config(
                "vae-tile",
                format!("expected at least {scale} pixels (one latent), got {tile}"),
            ));
        }
        let (h, w, t) = (card.image.height, card.image.width, tile / scale);
        let tiled = match tiling {
            DecoderTiling::Auto => h > t || w > t,
            DecoderTiling::Always => true,
            DecoderTiling::Never => false,
        };
        let spans = match tiled {
            // diffusers' tiled decoding overlaps its windows by a quarter.
            true => [Spans::new(h, t, (t / 4).max(1)), Spans::new(w, t, (t / 4).max(1))],
            false => [Spans::new(h, h, 0), Spans::new(w, w, 0)],
        };
        let weights = [0, 1].map(|a| {
            let s = &spans[a];
            (0..s.starts().len()).map(|k| (0..s.size() * scale).map(|u| s.weight(k, u, scale)).collect()).collect()
        });
        let path = card.dir.join(&section.onnx);
        let latent = vec![1, card.image.channels, spans[0].size(), spans[1].size()];
        let graph = Graph::load_with(&path, std::slice::from_ref(&latent), threads, plan_cache.clone(), packed)?;
        let want = [latent[2] * scale, latent[3] * scale];
        let c = match graph.output_shape(0) {
            &[1, c @ (1 | 3 | 4), h, w] if [h, w] == want => c,
            other => {
                return Err(Error::Model {
                    path,
                    message: format!(
                        "the first output is {other:?} for latents {latent:?}, expected pixels [1, 3, {}, {}] \
                         ({scale} pixels per latent, the model's decoder.scale)",
                        want[0], want[1]
                    ),
                })
            }
        };
        let input = ArrayD::zeros(IxDyn(&latent));
        Ok(Some(Decoder {
            graph,
            scaling: section.scaling_factor,
            shift: section.shift_factor,
            scale,
            shape: [c, h * scale, w * scale],
            spans,
            weights,
            input,
        }))
    }

    /// `[C, H, W]` of a decoded image.
    pub(super) fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Windows per image (1 when not tiled).
    pub(super) fn windows(&self) -> usize {
        self.spans[0].starts().len() * self.spans[1].starts().len()
    }

    /// One image's latents `[1, C, h, w]` to its pixels in `[-1, 1]`, `C·H·W` values.
    pub(super) fn decode(&mut self, latents: &Array4<f32>) -> Result<Vec<f32>> {
        if self.windows() == 1 {
            return self.run_window(latents, [0, 0]);
        }
        let mut blend = Blend::new(self.shape);
        let [sy, sx] = &self.spans;
        let (rows, cols) = (sy.starts().to_vec(), sx.starts().to_vec());
        for (ky, &top) in rows.iter().enumerate() {
            for (kx, &left) in cols.iter().enumerate() {
                let window = self.run_window(latents, [top, left])?;
                let s = self.scale;
                blend.add(&window, [top * s, left * s], &self.weights[0][ky], &self.weights[1][kx]);
            }
        }
        Ok(blend.finish())
    }

    /// The window of the latents at `[top, left]`, decoded.
    fn run_window(&mut self, latents: &Array4<f32>, [top, left]: [usize; 2]) -> Result<Vec<f32>> {
        let (scaling, shift) = (self.scaling, self.shift);
        let [h, w] = [self.spans[0].size(), self.spans[1].size()];
        let window = latents.slice(s![.., .., top..top + h, left..left + w]);
        ndarray::Zip::from(&mut self.input).and(window.into_dyn()).for_each(|d, &l| *d = l / scaling + shift);
        let out = self.graph.run(std::slice::from_ref(&self.input))?.swap_remove(0);
        Ok(out.into_raw_vec_and_offset().0)
    }
}

/// Rough previews of a latent model at almost no cost: the card's `[decoder] latent_rgb` map
/// from each latent to one RGB colour, each latent's colour filling its `scale × scale` pixels.
pub(super) struct LatentRgb {
    factors: Vec<[f32; 3]>,
    scale: usize,
}

impl LatentRgb {
    /// The card's map, or an error naming the flag that asked for it.
    pub(super) fn load(card: &ModelCard) -> Result<Self> {
        let Some(section) = &card.decoder else {
            return Err(Error::config("preview-decoder", "this model has no decoder: its previews are its samples"));
        };
        let Some(factors) = &section.latent_rgb else {
            return Err(Error::config(
                "preview-decoder",
                "linear previews need the card's [decoder] latent_rgb (one row of 3 factors per latent channel; \
                 an ONNX folder with an SD 1.x/2.x or SDXL VAE has them)",
            ));
        };
        Ok(LatentRgb { factors: factors.clone(), scale: section.scale })
    }

    /// `[3, h·scale, w·scale]` pixels in `[-1, 1]` (clamped) from latents `[1, C, h, w]`.
    pub(super) fn decode(&self, latents: &Array4<f32>) -> Vec<f32> {
        let [h, w] = [latents.shape()[2], latents.shape()[3]];
        let s = self.scale;
        let mut out = vec![0f32; 3 * h * s * w * s];
        for (k, plane) in out.chunks_exact_mut(h * s * w * s).enumerate() {
            for y in 0..h {
                let row: Vec<f32> = (0..w)
                    .map(|x| {
                        let v: f32 = self.factors.iter().enumerate().map(|(c, f)| latents[[0, c, y, x]] * f[k]).sum();
                        v.clamp(-1.0, 1.0)
                    })
                    .collect();
                for line in plane[y * s * w * s..(y + 1) * s * w * s].chunks_exact_mut(w * s) {
                    for (x, &v) in row.iter().enumerate() {
                        line[x * s..(x + 1) * s].fill(v);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod latent_rgb_tests {
    use super::*;

    #[test]
    fn each_latent_colours_its_pixels_by_the_factors() {
        let map = LatentRgb { factors: vec![[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]], scale: 2 };
        let latents = Array4::from_shape_vec((1, 2, 1, 2), vec![0.2, 0.8, 0.4, -0.6]).unwrap();
        let px = map.decode(&latents);
        assert_eq!(px.len(), 3 * 2 * 4);
        // R: channel 0; G: channel 1; B: (c0 − c1)/2, clamped.
        assert_eq!(&px[..8], &[0.2, 0.2, 0.8, 0.8, 0.2, 0.2, 0.8, 0.8]);
        assert_eq!(&px[8..12], &[0.4, 0.4, -0.6, -0.6]);
        let b: Vec<f32> = px[16..20].to_vec();
        assert!((b[0] - -0.1).abs() < 1e-6 && (b[2] - 0.7).abs() < 1e-6, "{b:?}");
    }
}
