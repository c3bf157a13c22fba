//! Pixels to latents for image-to-image: the VAE encoder graph, its latent distribution taken at
//! the mean, then `(mean − shift_factor) · scaling_factor`, as diffusers encodes an init image.
//!
//! diffusers' img2img pipelines sample the distribution (`mean + std · ε`); its mean is used here
//! so that an init image gives the same latents every time, whatever the seed (the sampled
//! spread is small next to the noise that image-to-image adds).

use ndarray::{s, Array4, ArrayD, ArrayView4, IxDyn};

use crate::card::ModelCard;
use crate::error::{Error, Result};
use crate::runtime::{Graph, PlanCache, PlanFile, WeightPrecision};

pub(super) struct Encoder {
    graph: Graph,
    scaling: f32,
    shift: f32,
    /// `[C, h, w]` of one image's latents.
    latent: [usize; 3],
    input: ArrayD<f32>,
}

impl Encoder {
    /// What became of the plan file of the graph's packed weights.
    pub(super) fn plan_file(&self) -> &PlanFile {
        self.graph.plan_file()
    }

    /// The card's `[encoder]` for images of `pixels` (`[3, H, W]`), or `None` without one.
    pub(super) fn load(
        card: &ModelCard,
        pixels: [usize; 3],
        threads: usize,
        plan_cache: &PlanCache,
        weights: WeightPrecision,
    ) -> Result<Option<Self>> {
        let (Some(section), Some(decoder)) = (&card.encoder, &card.decoder) else { return Ok(None) };
        let path = card.dir.join(&section.onnx);
        let shape = vec![1, pixels[0], pixels[1], pixels[2]];
        let graph = Graph::load_with(&path, std::slice::from_ref(&shape), threads, plan_cache.clone(), weights)?;
        let latent = [card.image.channels, card.image.height, card.image.width];
        let [c, h, w] = latent;
        match graph.output_shape(0) {
            &[1, k, oh, ow] if (k == c || k == 2 * c) && [oh, ow] == [h, w] => {}
            other => {
                return Err(Error::Model {
                    path,
                    message: format!(
                        "the first output is {other:?} for pixels {shape:?}, expected the latent distribution \
                         [1, {}, {h}, {w}] (mean and log-variance) or latents [1, {c}, {h}, {w}]",
                        2 * c
                    ),
                })
            }
        }
        let input = ArrayD::zeros(IxDyn(&shape));
        Ok(Some(Encoder { graph, scaling: decoder.scaling_factor, shift: decoder.shift_factor, latent, input }))
    }

    /// One image's pixels `[1, 3, H, W]` in `[-1, 1]` to its latents `[1, C, h, w]`.
    pub(super) fn encode(&mut self, pixels: ArrayView4<f32>) -> Result<Array4<f32>> {
        self.input.assign(&pixels.into_dyn());
        let out = self.graph.run(std::slice::from_ref(&self.input))?.swap_remove(0);
        let [c, h, w] = self.latent;
        let mean = out.slice(s![0..1, 0..c, .., ..]);
        let (scaling, shift) = (self.scaling, self.shift);
        let latents = mean.mapv(|m| (m - shift) * scaling);
        latents.into_shape_with_order((1, c, h, w)).map_err(|e| Error::Inference(e.to_string()))
    }
}
