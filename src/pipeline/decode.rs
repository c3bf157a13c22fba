//! Latents to pixels: the VAE decoder graph on `latents / scaling_factor + shift_factor`, as
//! diffusers decodes.

use ndarray::{Array4, ArrayD, IxDyn};

use crate::card::ModelCard;
use crate::error::{Error, Result};
use crate::runtime::Graph;

pub(super) struct Decoder {
    graph: Graph,
    scaling: f32,
    shift: f32,
    /// `[C, H, W]` of one decoded image.
    shape: [usize; 3],
    input: ArrayD<f32>,
}

impl Decoder {
    pub(super) fn load(card: &ModelCard, threads: usize) -> Result<Option<Self>> {
        let Some(section) = &card.decoder else { return Ok(None) };
        let path = card.dir.join(&section.onnx);
        let latent = vec![1, card.image.channels, card.image.height, card.image.width];
        let graph = Graph::load(&path, std::slice::from_ref(&latent), threads)?;
        let want = [card.image.height * section.scale, card.image.width * section.scale];
        let shape = match graph.output_shape(0) {
            &[1, c @ (1 | 3 | 4), h, w] if [h, w] == want => [c, h, w],
            other => {
                return Err(Error::Model {
                    path,
                    message: format!(
                        "the first output is {other:?} for latents {latent:?}, expected pixels [1, 3, {}, {}] \
                         (decoder.scale = {})",
                        want[0], want[1], section.scale
                    ),
                })
            }
        };
        let input = ArrayD::zeros(IxDyn(&latent));
        Ok(Some(Decoder { graph, scaling: section.scaling_factor, shift: section.shift_factor, shape, input }))
    }

    /// `[C, H, W]` of a decoded image.
    pub(super) fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// One image's latents `[1, C, h, w]` to its pixels in `[-1, 1]`, `C·H·W` values.
    pub(super) fn decode(&mut self, latents: &Array4<f32>) -> Result<Vec<f32>> {
        let (scaling, shift) = (self.scaling, self.shift);
        ndarray::Zip::from(&mut self.input).and(latents.view().into_dyn()).for_each(|d, &l| *d = l / scaling + shift);
        let out = self.graph.run(std::slice::from_ref(&self.input))?.swap_remove(0);
        Ok(out.into_raw_vec_and_offset().0)
    }
}
