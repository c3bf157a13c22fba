//! The pipeline: model card → loaded denoiser → sampler loop → samples.
//!
//! Images are generated one at a time with batch-1 plans: every sampler is per-image, so this
//! gives the same result as a batched run, keeps peak memory at one image, and lets image `i`
//! of a request be reproduced alone (its noise is stream `i` of the seed).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ndarray::{s, Array4, ArrayD};

use crate::card::{ModelCard, TimeInput};
use crate::error::{Error, Result};
use crate::noise::SeededNoise;
use crate::runtime::{Conditions, Denoiser, PlanCache, PlanFile, WeightPrecision};
pub use crate::runtime::{Convolution, Precision};
use crate::sampler::{self, NoiseSource, SamplerKind, SamplerOptions};
use edit::{check_batch, one_of, Canvas};

mod conditioning;
mod decode;
mod edit;
mod encode;
mod guidance;
mod text;
mod tiles;
pub use crate::tokenizer::Tokens;
pub use decode::DecoderTiling;
pub use guidance::GuidanceBatching;

/// Options fixed when the pipeline is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for the model (default: the available cores). More than
    /// [`std::thread::available_parallelism`] reports are not started: threads beyond the cores
    /// only wait on each other, so the pipeline runs with as many as there are cores
    /// ([`Denoiser::threads`] tells how many).
    pub threads: usize,
    /// Guided-step strategy.
    pub guidance_batching: GuidanceBatching,
    /// Arithmetic precision of the denoiser (f16 pays off only on CPUs with fp16 arithmetic).
    pub precision: Precision,
    /// How 3×3 convolutions run (Winograd by default).
    pub convolution: Convolution,
    /// The output's `[width, height]` in pixels, in place of the card's size (a latent model's
    /// is its latents' times the decoder's scale, so both must be multiples of the scale).
    pub size: Option<[usize; 2]>,
    /// A decoder folder (`model.onnx` + `config.json`) to use in place of the card's, e.g. a
    /// TAESD-class tiny decoder ([`ModelCard::replace_decoder`]).
    pub decoder: Option<PathBuf>,
    /// When a latent model's decoder works in overlapping windows.
    pub decoder_tiling: DecoderTiling,
    /// The side of a decoder window in pixels (default: the card's `[decoder] tile_size`).
    pub decoder_tile: Option<usize>,
    /// With [`size`](LoadOptions::size) above the model's own: denoise the larger canvas in
    /// windows of the model's size overlapping by at least this many pixels, their predictions
    /// blended at every step (MultiDiffusion, Bar-Tal et al. 2023), instead of running the model
    /// at the canvas size. Memory stays that of one window's call.
    pub tile_overlap: Option<usize>,
    /// What decodes [`Request::preview_every`]'s previews of a latent model.
    /// TAESD-class tiny decoder (default: the model's decoder).
    pub preview_decoder: PreviewDecoder,
    /// Where the plan file of each graph's packed weights goes (default: beside the ONNX file,
    /// else in the cache folder): later loads map it and the kernels read their weights
    /// through the map, so they cost no anonymous memory. [`Pipeline::plan_files`] tells what
    /// became of each.
    pub plan_cache: PlanCache,
    /// The precision our operators' packed weights are kept in, on the heap and in the plan
    /// file: float16 halves their bytes; the arithmetic stays float32 (see `docs/memory.md`).
    pub weights: WeightPrecision,
    /// Bytes of the denoiser's weights to lock in memory once loaded: the start of its plan
    /// file ([`Denoiser::lock_weights`]). For a model larger than the memory it may use, the
    /// part locked is never read twice.
    pub lock_weights: Option<u64>,
}

/// What turns a latent model's previews into pixels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PreviewDecoder {
    /// The model's decoder ([`LoadOptions::decoder`] when given).
    #[default]
    Model,
    /// A decoder folder (`model.onnx` + `config.json`), e.g. a TAESD-class tiny decoder.
    Folder(PathBuf),
    /// The card's `[decoder] latent_rgb` map, each latent one colour: a rough preview at almost
    /// no cost.
    Linear,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            guidance_batching: GuidanceBatching::default(),
            precision: Precision::default(),
            convolution: Convolution::default(),
            size: None,
            decoder: None,
            decoder_tiling: DecoderTiling::default(),
            decoder_tile: None,
            preview_decoder: PreviewDecoder::Model,
            tile_overlap: None,
            plan_cache: PlanCache::Auto,
            weights: WeightPrecision::F32,
            lock_weights: None,
        }
    }
}

/// What to generate. `None` fields take the card's `[defaults]`.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Seed of the noise streams.
    pub seed: u64,
    /// Number of images (ignored when `noise` is given, or an `init` of several images: their
    /// batch sets it).
    pub num_images: usize,
    /// Index of the request's first image: image `i` of the request is image `first_image + i`
    /// of the seed (its noise stream, and its label when `classes` cycle), so a run split in
    /// parts, or resumed after an interruption, gives the same images as one run.
    pub first_image: usize,
    /// Sampler.
    pub sampler: Option<SamplerKind>,
    /// Number of steps.
    pub steps: Option<usize>,
    /// Class labels: one for every image, or one per image (cycled). `None`: the null class.
    pub classes: Option<Vec<i64>>,
    /// Classifier-free guidance scale; 1 disables guidance.
    pub guidance: Option<f32>,
    /// DDIM's η.
    pub eta: Option<f32>,
    /// Unit-variance starting noise `[batch, C, H, W]`, used as diffusers uses `latents`.
    pub noise: Option<Array4<f32>>,
    /// Conditioning for cross-attention models (`[1, tokens, dim]`, shared by all images).
    pub context: Option<ArrayD<f32>>,
    /// The prompt of a model with a text encoder (the card's `[text_encoder]`); `None` is the
    /// empty prompt. Its embedding becomes `context`.
    pub prompt: Option<String>,
    /// What guidance steers away from (the unconditional branch's prompt); `None` is the empty
    /// prompt, as in diffusers.
    pub negative_prompt: Option<String>,
    /// Values of the card's conditioning inputs (`[model.conditioning.NAME]`), by name; an
    /// input not given takes the card's `default`. Each is one image's values (the input's
    /// shape after its batch axis, e.g. `[]` for one number per image), or rows of them
    /// (`[rows, ...]`, or a flat list), image `i` taking row `i mod rows` as `classes` cycle.
    pub conditioning: BTreeMap<String, ArrayD<f32>>,
    /// Image-to-image: the image to start from, `[batch, C, H, W]` in the model's space (the
    /// card's `[image]`, a latent model's latents), one for all images or one per image. It is
    /// noised to where [`strength`](Request::strength) starts the schedule (the noise is
    /// [`noise`](Request::noise) when given), then sampled from there, as diffusers' img2img
    /// pipelines do.
    pub init: Option<Array4<f32>>,
    /// How much of the schedule image-to-image runs, in (0, 1] (default 0.8, or 1 with a
    /// [`mask`](Request::mask), as diffusers): the
    /// last `int(steps · strength)` steps (LCM takes its steps from the lowest `strength` of its
    /// grid). 1 noises the image completely.
    pub strength: Option<f64>,
    /// Image-to-image from a given noise level, instead of a
    /// [`strength`](Request::strength): the init plus this σ times the noise, then `steps` steps of
    /// the sampler from this σ down ([`sampler::build_from_sigma`] says which schedule). For the
    /// σ-space samplers (euler, euler_ancestral, heun, dpmpp_2m, consistency) and σ-conditioned
    /// models; it must lie within the schedule's σ range.
    pub init_sigma: Option<f64>,
    /// Inpainting, with `init`: where to draw anew, `[batch, 1, H, W]` in the model's space (a
    /// latent model's latent size: [`Pipeline::mask_from_image`]), 1 to regenerate and 0 to keep,
    /// one for all images or one per image. After every step the kept part is put back as the
    /// init noised to the next step (at the last, the init itself), as diffusers'
    /// `StableDiffusionInpaintPipeline` does for a UNet that takes no mask; at strength 1 the run
    /// starts from pure noise.
    pub mask: Option<Array4<f32>>,
    /// An inpainting model's (`[model] inpainting`) third input: the init with the part to
    /// regenerate blanked, `[batch, C, H, W]` in the model's space, one for all images or one per
    /// image. A latent model's is the VAE encoding of the masked pixels
    /// ([`Pipeline::masked_init`]); `None` for a pixel model: the init, zero where the mask is
    /// at least 0.5. Such a model sees the mask and this at every step, so no blending runs.
    pub masked_init: Option<Array4<f32>>,
    /// Every this many steps, and at the last, the step callback gets a preview
    /// ([`StepInfo::preview`]): the clean image the model predicts at that step (x̂₀). 0: none.
    pub preview_every: usize,
}

/// One finished image, as [`Pipeline::generate_each`] hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// Image index (counting [`Request::first_image`]).
    pub index: usize,
    /// The image, `C·H·W` values ([`Pipeline::output_shape`]) in [`Pipeline::value_range`]:
    /// for a latent model the decoded pixels, else the final sample.
    pub image: &'a [f32],
    /// The sampler's final sample, `C·H·W` of the card's `[image]` (for a latent model, the
    /// latents before decoding).
    pub sample: &'a [f32],
}

/// Progress of one model call, for callbacks.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    /// Image index (0-based, counted from 0 of the seed, i.e. including
    /// [`Request::first_image`]).
    pub image: usize,
    /// Step within the image (1-based).
    pub step: usize,
    /// Steps per image (model calls in the sampler loop).
    pub total: usize,
    /// Time spent on this step (its preview not counted).
    pub elapsed: Duration,
    /// On the steps [`Request::preview_every`] asks for: x̂₀, the clean image the model predicts
    /// from this step, as an output image (`C·H·W` of [`Pipeline::output_shape`], in
    /// [`Pipeline::value_range`]; a latent model's decoded by the preview decoder).
    pub preview: Option<&'a [f32]>,
}

/// What a request produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Final images, `[images, C, H, W]` ([`Pipeline::output_shape`]), in
    /// [`Pipeline::value_range`]: decoded pixels for a latent model, else the samples.
    pub samples: Array4<f32>,
    /// The sampler that ran.
    pub sampler: SamplerKind,
    /// Steps per image, as requested.
    pub steps: usize,
    /// Sampler loop iterations per image (Heun evaluates 2·steps − 1 times).
    pub timesteps: usize,
    /// Guidance scale applied.
    pub guidance: f32,
    /// Time in the stages around the sampler loop.
    pub stages: Stages,
}

/// Time a request spent outside the sampler loop's model calls (which [`StepInfo::elapsed`]
/// reports one by one).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stages {
    /// Encoding the prompts (zero for a prompt encoded by an earlier request: the pipeline keeps
    /// the last few prompts' embeddings).
    pub text_encoder: Duration,
    /// Decoding the final latents into pixels, all images together.
    pub decoder: Duration,
    /// Making the previews [`Request::preview_every`] asks for (x̂₀, and a latent model's
    /// decoding of it), all steps together; zero without previews.
    pub previews: Duration,
}

/// What [`Pipeline::generate_into`] ran: a [`Generation`] without the samples, which went into
/// the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunInfo {
    /// Images written.
    pub images: usize,
    /// The sampler that ran.
    pub sampler: SamplerKind,
    /// Steps per image, as requested.
    pub steps: usize,
    /// Sampler loop iterations per image (Heun evaluates 2·steps − 1 times).
    pub timesteps: usize,
    /// Guidance scale applied.
    pub guidance: f32,
    /// Time in the stages around the sampler loop.
    pub stages: Stages,
}

/// Working arrays of the sampler loop, one image each (two for batched guidance), sized from
/// the card at load so that generating does not allocate them again.
struct Scratch {
    x: Array4<f32>,
    x_in: Array4<f32>,
    out: Array4<f32>,
    /// x̂₀ for a preview.
    x0: Array4<f32>,
    /// Image-to-image: this image's init and the unit noise put on it.
    init: Array4<f32>,
    noise: Array4<f32>,
    /// An inpainting model's input: the scaled sample, the mask and the masked init.
    inpaint_in: Option<Array4<f32>>,
    guided: guidance::Scratch,
    /// One image's values of each conditioning input, for the conditional and the
    /// unconditional branch, and both as one batch of 2.
    extra: Vec<ArrayD<f32>>,
    extra_null: Vec<ArrayD<f32>>,
    extra_pair: Vec<ArrayD<f32>>,
}

impl Scratch {
    /// `in_channels`: of the model's input (`2·c + 1` for an inpainting model).
    fn new(
        [c, h, w]: [usize; 3],
        in_channels: usize,
        window: [usize; 3],
        conditioning: &[crate::runtime::ConditioningInput],
    ) -> Self {
        let one = || Array4::<f32>::zeros((1, c, h, w));
        let arrays = |batch: usize| -> Vec<ArrayD<f32>> {
            conditioning
                .iter()
                .map(|i| ArrayD::zeros(std::iter::once(batch).chain(i.dims.iter().copied()).collect::<Vec<_>>()))
                .collect()
        };
        Scratch {
            x: one(),
            x_in: one(),
            out: one(),
            x0: one(),
            init: one(),
            noise: one(),
            inpaint_in: (in_channels != c).then(|| Array4::zeros((1, in_channels, h, w))),
            guided: guidance::Scratch::new(in_channels, window),
            extra: arrays(1),
            extra_null: arrays(1),
            extra_pair: arrays(2),
        }
    }
}

/// A request checked against the card, with the card's defaults filled in.
struct Resolved {
    kind: SamplerKind,
    steps: usize,
    /// Model calls per image: the sampler's timesteps from `start`.
    total: usize,
    /// Where the schedule starts.
    start: Start,
    /// The index of the first timestep run (image-to-image at a strength skips the first ones).
    first: usize,
    /// The scale of classifier-free guidance (1: none).
    guidance: f32,
    /// The scale the request asked for (or the card's default), for [`RunInfo`].
    requested: f32,
    opts: SamplerOptions,
    images: usize,
    /// Each conditioning input's values, and its null values when guided.
    conditioning: Vec<conditioning::Rows>,
    nulls: Vec<conditioning::Rows>,
    text: Option<Prompts>,
    text_time: Duration,
}

/// Where a request's schedule starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    /// From pure noise.
    Noise,
    /// Image-to-image at a strength: diffusers' truncated schedule.
    Strength(f64),
    /// Image-to-image from a given σ.
    Sigma(f64),
}

/// A request's prompt embeddings.
struct Prompts {
    cond: ArrayD<f32>,
    /// When guided: the negative prompt's, and both as one batch of 2.
    guided: Option<[ArrayD<f32>; 2]>,
}

/// A model loaded once, ready to generate.
///
/// Load it once and call [`generate`](Pipeline::generate) or
/// [`generate_into`](Pipeline::generate_into) for every image: the tract plan, its state and
/// the sampler loop's working arrays are kept between calls, so after the first call the heap
/// does not grow with the number of images (`tests/alloc_reuse.rs` measures it).
///
/// `Pipeline` is `Send` and `Sync`: it can move to a worker thread or sit in an `Arc`.
/// Generating needs `&mut self` (tract's run state is mutable), so threads that share one
/// pipeline take turns through a `Mutex`; for parallel generation load one pipeline per thread.
pub struct Pipeline {
    card: ModelCard,
    denoiser: Denoiser,
    options: LoadOptions,
    scratch: Scratch,
    card_values: conditioning::CardValues,
    text: Option<text::TextEncoder>,
    decoder: Option<decode::Decoder>,
    /// The decoder of previews, when not the model's.
    preview: Option<decode::Decoder>,
    /// The latent-to-RGB map of linear previews.
    linear: Option<decode::LatentRgb>,
    /// The VAE encoder, loaded at its first use (only image-to-image from pixels needs it).
    encoder: Option<encode::Encoder>,
    /// MultiDiffusion's windows over a canvas larger than the model.
    canvas: Option<Canvas>,
}

impl Pipeline {
    /// What became of the plan file of each graph with packed weights, by part: `denoiser`,
    /// `text_encoder`, `decoder`, `preview_decoder`, `encoder` (once loaded).
    pub fn plan_files(&self) -> Vec<(&'static str, &PlanFile)> {
        let mut out = vec![("denoiser", self.denoiser.plan_file())];
        out.extend(self.text.as_ref().map(|t| ("text_encoder", t.plan_file())));
        out.extend(self.decoder.as_ref().map(|d| ("decoder", d.plan_file())));
        out.extend(self.preview.as_ref().map(|d| ("preview_decoder", d.plan_file())));
        out.extend(self.encoder.as_ref().map(|e| ("encoder", e.plan_file())));
        out
    }

    /// Loads the model directory `dir`: its `model.toml` and ONNX file, or an ONNX Stable
    /// Diffusion folder (`model_index.json`, `unet/`, `text_encoder/`, `tokenizer/`,
    /// `vae_decoder/`, `scheduler/`; see [`ModelCard::load`]).
    pub fn load(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let mut card = ModelCard::load(dir)?;
        let window = amend(&mut card, &options)?;
        let denoiser = Denoiser::load_with(&window, options.threads, options.plan_cache.clone(), options.weights)?;
        let size = [window.image.height, window.image.width];
        Self::from_parts(card, denoiser, options, size)
    }

    /// Loads from a parsed card and ONNX bytes held in memory (e.g. `include_bytes!`).
    ///
    /// ```
    /// use edge_diffuse::{LoadOptions, ModelCard, Pipeline};
    /// use std::path::{Path, PathBuf};
    ///
    /// # fn main() -> edge_diffuse::Result<()> {
    /// // In firmware: include_str!("../models/fmnist-student/model.toml") and include_bytes!(…).
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student");
    /// let card_text = std::fs::read_to_string(format!("{dir}/model.toml")).unwrap();
    /// let onnx = std::fs::read(format!("{dir}/denoiser.onnx")).unwrap();
    /// let card = ModelCard::parse(&card_text, Path::new(""), Path::new("model.toml"))?;
    /// let pipe = Pipeline::from_bytes(card, &onnx, LoadOptions { threads: 1, ..Default::default() })?;
    /// assert_eq!(pipe.image_len(), 32 * 32);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_bytes(mut card: ModelCard, onnx: &[u8], options: LoadOptions) -> Result<Self> {
        let window = amend(&mut card, &options)?;
        let mut denoiser = Denoiser::from_bytes(onnx, &window, options.threads, card.onnx_path())?;
        denoiser.set_plan_cache(options.plan_cache.clone());
        denoiser.set_weight_precision(options.weights);
        let size = [window.image.height, window.image.width];
        Self::from_parts(card, denoiser, options, size)
    }

    /// `window`: `[height, width]` the denoiser runs at (the card's own size, unless tiled).
    fn from_parts(card: ModelCard, mut denoiser: Denoiser, options: LoadOptions, window: [usize; 2]) -> Result<Self> {
        denoiser.set_precision(options.precision);
        denoiser.set_convolution(options.convolution);
        let text = text::TextEncoder::load(&card, options.threads, &options.plan_cache, options.weights)?;
        if let Some(t) = &text {
            let [tokens, dim] = t.shape();
            denoiser.set_context_shape(tokens, dim)?;
        }
        let decoder = decode::Decoder::load(
            &card,
            options.decoder_tiling,
            options.decoder_tile,
            options.threads,
            &options.plan_cache,
            options.weights,
        )?;
        let linear = match options.preview_decoder {
            PreviewDecoder::Linear => Some(decode::LatentRgb::load(&card)?),
            _ => None,
        };
        let preview = match &options.preview_decoder {
            PreviewDecoder::Folder(dir) => {
                let mut with = card.clone();
                with.replace_decoder(dir).map_err(|e| match e {
                    Error::Config { message, .. } => Error::config("preview-decoder", message),
                    e => e,
                })?;
                decode::Decoder::load(
                    &with,
                    options.decoder_tiling,
                    options.decoder_tile,
                    options.threads,
                    &options.plan_cache,
                    options.weights,
                )?
            }
            _ => None,
        };
        // Build the plans now so load errors surface here, not at the first image: batch 1, and
        // batch 2 when guided steps run as one call. A pipeline runs no other batch size, so the
        // last plan consumes the source graph (on the 35.7M UNet about 130 MB of 3×3 kernels
        // that the plans hold transformed).
        let card_values = conditioning::CardValues::load(&card, denoiser.conditioning_inputs())?;
        let class_null =
            card.model.inputs.class_labels.is_some() && card.classes.as_ref().is_some_and(|c| c.null.is_some());
        let guidable = (text.is_some() || class_null || !denoiser.conditioning_inputs().is_empty())
            && card_values.nulls().is_some();
        if options.guidance_batching == GuidanceBatching::Batched && guidable {
            denoiser.prepare(1)?;
            denoiser.prepare_final(2)?;
        } else {
            denoiser.prepare_final(1)?;
        }
        if let Some(bytes) = options.lock_weights {
            denoiser.lock_weights(bytes)?;
        }
        let chw = [card.image.channels, card.image.height, card.image.width];
        let inputs = card.sample_channels();
        let scale = card.decoder.as_ref().map_or(1, |d| d.scale);
        let canvas = match options.tile_overlap {
            Some(px) => Some(Canvas::new(chw, inputs, [window[0], window[1]], px, scale)?),
            None => None,
        };
        let scratch = Scratch::new(chw, inputs, [chw[0], window[0], window[1]], denoiser.conditioning_inputs());
        Ok(Pipeline {
            card,
            denoiser,
            options,
            scratch,
            card_values,
            text,
            decoder,
            preview,
            linear,
            encoder: None,
            canvas,
        })
    }

    /// The model card.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// The loaded denoiser.
    pub fn denoiser(&self) -> &Denoiser {
        &self.denoiser
    }

    /// Values in one output image, `C·H·W` of [`output_shape`](Pipeline::output_shape) (an
    /// image and its pixels hold the same number).
    pub fn image_len(&self) -> usize {
        self.output_shape().iter().product()
    }

    /// `[C, H, W]` of an output image: a latent model's decoded pixels, else the card's
    /// `[image]`.
    pub fn output_shape(&self) -> [usize; 3] {
        match &self.decoder {
            Some(d) => d.shape(),
            None => [self.card.image.channels, self.card.image.height, self.card.image.width],
        }
    }

    /// The output's value range, mapped to pixels 0..=255: `[-1, 1]` for a decoder's pixels,
    /// else the card's `image.value_range`.
    pub fn value_range(&self) -> [f32; 2] {
        match &self.decoder {
            Some(_) => [-1.0, 1.0],
            None => self.card.image.value_range,
        }
    }

    /// Whether [`encode`](Pipeline::encode) can turn images into this model's space: a latent
    /// model with a VAE encoder (the card's `[encoder]`; `vae_encoder/` in an ONNX folder).
    pub fn encodes_images(&self) -> bool {
        self.card.encoder.is_some() && self.decoder.is_some()
    }

    /// Images `[batch, C, H, W]` of [`output_shape`](Pipeline::output_shape), in
    /// [`value_range`](Pipeline::value_range), to the model's space, for [`Request::init`]: a
    /// latent model's VAE encoder (loaded at the first call), else the images as they are.
    pub fn encode(&mut self, images: &Array4<f32>) -> Result<Array4<f32>> {
        let shape = self.output_shape();
        if images.shape()[1..] != shape || images.shape()[0] == 0 {
            return Err(Error::Tensor {
                what: "init".into(),
                message: format!(
                    "expected images [batch, {}, {}, {}], found {:?}",
                    shape[0],
                    shape[1],
                    shape[2],
                    images.shape()
                ),
            });
        }
        if self.decoder.is_none() {
            return Ok(images.clone());
        }
        if self.encoder.is_none() {
            let o = &self.options;
            self.encoder = encode::Encoder::load(&self.card, shape, o.threads, &o.plan_cache, o.weights)?;
        }
        let Some(encoder) = self.encoder.as_mut() else {
            return Err(Error::config(
                "init",
                "this latent model has no VAE encoder (an [encoder] in its card, vae_encoder/ in its folder): \
                 give the init as latents",
            ));
        };
        let [c, h, w] = [self.card.image.channels, self.card.image.height, self.card.image.width];
        let mut out = Array4::zeros((images.shape()[0], c, h, w));
        for (i, image) in images.outer_iter().enumerate() {
            let one = image.insert_axis(ndarray::Axis(0));
            out.slice_mut(s![i..i + 1, .., .., ..]).assign(&encoder.encode(one)?);
        }
        Ok(out)
    }

    /// An inpainting mask for [`Request::mask`] from a mask image `[batch, 1, H, W]` of
    /// [`output_shape`](Pipeline::output_shape)'s size, values in `[0, 1]` (white, 1: regenerate):
    /// made 0 or 1 at 0.5, then for a latent model cut to the latent size by nearest neighbours,
    /// as diffusers prepares it.
    pub fn mask_from_image(&self, mask: &Array4<f32>) -> Result<Array4<f32>> {
        let [_, big_h, big_w] = self.output_shape();
        if mask.shape()[1..] != [1, big_h, big_w] || mask.shape()[0] == 0 {
            return Err(Error::Tensor {
                what: "mask".into(),
                message: format!("expected a mask [batch, 1, {big_h}, {big_w}], found {:?}", mask.shape()),
            });
        }
        let [h, w] = [self.card.image.height, self.card.image.width];
        let (sy, sx) = (big_h / h, big_w / w);
        Ok(Array4::from_shape_fn((mask.shape()[0], 1, h, w), |(b, _, y, x)| {
            if mask[[b, 0, y * sy, x * sx]] >= 0.5 {
                1.0
            } else {
                0.0
            }
        }))
    }

    /// An inpainting model's [`Request::masked_init`] from images and mask images as
    /// [`encode`](Pipeline::encode) and [`mask_from_image`](Pipeline::mask_from_image) take them:
    /// the images, zero (mid-grey for pixels in `[-1, 1]`) where the mask is at least 0.5, then
    /// encoded, as diffusers' inpainting pipeline prepares its masked image.
    pub fn masked_init(&mut self, images: &Array4<f32>, masks: &Array4<f32>) -> Result<Array4<f32>> {
        let [_, h, w] = self.output_shape();
        let n = images.shape()[0];
        check_batch("mask", masks, [1, h, w], n, "the output's size")?;
        let mut masked = images.clone();
        for i in 0..n {
            edit::blank_masked(masked.slice_mut(s![i..i + 1, .., .., ..]), one_of(images, i), one_of(masks, i));
        }
        self.encode(&masked).map_err(|e| match e {
            Error::Tensor { message, .. } => Error::Tensor { what: "init".into(), message },
            e => e,
        })
    }

    /// Whether the model is prompted with text (its card has a `[text_encoder]`).
    pub fn takes_text(&self) -> bool {
        self.text.is_some()
    }

    /// The token ids of `text` as the model's tokenizer gives them (padded or truncated to its
    /// length; [`Tokens::truncated`] tells whether words were cut), or `None` for a model that
    /// takes no text.
    pub fn tokenize(&self, text: &str) -> Option<Tokens> {
        self.text.as_ref().map(|t| t.tokenize(text))
    }

    /// Images `req` generates: the batch of its `noise`, else of its `init` when that holds more
    /// than one image, else `num_images` (at least 1).
    pub fn num_images(&self, req: &Request) -> usize {
        match (&req.noise, &req.init) {
            (Some(noise), _) => noise.shape()[0],
            (None, Some(init)) if init.shape()[0] > 1 => init.shape()[0],
            _ => req.num_images.max(1),
        }
    }

    /// Buffer length [`generate_into`](Pipeline::generate_into) and
    /// [`pixels_into`](Pipeline::pixels_into) need for `req`: images × `C·H·W`.
    pub fn output_len(&self, req: &Request) -> usize {
        self.num_images(req).saturating_mul(self.image_len())
    }

    /// Generates images; `on_step` runs after every model call and may stop the run by
    /// returning `ControlFlow::Break(())` (the result is then [`Error::Cancelled`]).
    ///
    /// Allocates the returned samples; [`generate_into`](Pipeline::generate_into) writes into a
    /// buffer the caller keeps instead.
    pub fn generate(
        &mut self,
        req: &Request,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let r = self.resolve(req)?;
        let [c, h, w] = self.output_shape();
        let mut samples = Array4::<f32>::zeros((r.images, c, h, w));
        let buf = samples.as_slice_mut().expect("a new array is contiguous");
        let info = self.run_into(req, &r, buf, on_step)?;
        Ok(Generation {
            samples,
            sampler: info.sampler,
            steps: info.steps,
            timesteps: info.timesteps,
            guidance: info.guidance,
            stages: info.stages,
        })
    }

    /// Generates into `samples`, `[images, C, H, W]` in the model's value range, row-major; it
    /// must hold at least [`output_len`](Pipeline::output_len) values (the rest is left as is),
    /// else the result is [`Error::BufferTooSmall`]. `on_step` works as in
    /// [`generate`](Pipeline::generate). On an error the buffer's contents are unspecified.
    ///
    /// ```
    /// use std::ops::ControlFlow;
    /// use std::time::Duration;
    /// use edge_diffuse::{LoadOptions, Pipeline, Request};
    ///
    /// # fn main() -> edge_diffuse::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student");
    /// let mut pipe = Pipeline::load(dir, LoadOptions { threads: 1, ..Default::default() })?;
    /// let mut request = Request { num_images: 1, classes: Some(vec![7]), ..Default::default() };
    /// let mut samples = vec![0f32; pipe.output_len(&request)]; // [1, 1, 32, 32], allocated once
    /// let mut pixels = vec![0u8; samples.len()];
    /// for seed in 0..3 {
    ///     request.seed = seed; // one trigger
    ///     pipe.generate_into(&request, &mut samples, &mut |step| {
    ///         // Break(()) cancels: the result is Error::Cancelled
    ///         if step.elapsed > Duration::from_secs(5) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    ///     })?;
    ///     pipe.pixels_into(&samples, &mut pixels)?; // 32×32 grey, row by row
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn generate_into(
        &mut self,
        req: &Request,
        samples: &mut [f32],
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<RunInfo> {
        let r = self.resolve(req)?;
        self.run_into(req, &r, samples, on_step)
    }

    /// Generates images and hands each to `on_image` as soon as it is done ([`Finished`]: its
    /// index, counting [`Request::first_image`], the image, and the final sample it came from).
    /// Memory does not grow with the number of images, so a caller can stream any number of
    /// them to files. `on_step` works as in [`generate`](Pipeline::generate); either callback
    /// may stop the run by returning `ControlFlow::Break(())` (the result is then
    /// [`Error::Cancelled`]); every image handed over before that is complete.
    ///
    /// ```
    /// use std::ops::ControlFlow;
    /// use edge_diffuse::{LoadOptions, Pipeline, Request};
    ///
    /// # fn main() -> edge_diffuse::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student");
    /// let mut pipe = Pipeline::load(dir, LoadOptions { threads: 1, ..Default::default() })?;
    /// // Images 5 and 6 of seed 3: the same as the last two of a 7-image request.
    /// let request = Request { seed: 3, num_images: 2, first_image: 5, ..Default::default() };
    /// let mut seen = Vec::new();
    /// pipe.generate_each(&request, &mut |_| ControlFlow::Continue(()), &mut |done| {
    ///     seen.push((done.index, done.image.len())); // e.g. write image `index` to its file here
    ///     ControlFlow::Continue(())
    /// })?;
    /// assert_eq!(seen, [(5, 32 * 32), (6, 32 * 32)]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn generate_each(
        &mut self,
        req: &Request,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
        on_image: &mut dyn FnMut(&Finished) -> ControlFlow<()>,
    ) -> Result<RunInfo> {
        let r = self.resolve(req)?;
        self.run(req, &r, on_step, on_image)
    }

    /// Turns samples (`[images, C, H, W]` as [`generate_into`](Pipeline::generate_into) writes
    /// them) into 8-bit pixels, `[images, H, W, C]` (channels interleaved, rows top to bottom),
    /// mapping the card's `value_range` to 0–255 as the PNG output does. Converts
    /// `samples.len() / image_len()` whole images; `pixels` must hold as many values, else
    /// [`Error::BufferTooSmall`]. Returns the number of images converted.
    pub fn pixels_into(&self, samples: &[f32], pixels: &mut [u8]) -> Result<usize> {
        let [c, h, w] = self.output_shape();
        let per = c * h * w;
        let images = samples.len() / per;
        let needed = images * per;
        if pixels.len() < needed {
            return Err(Error::BufferTooSmall { what: "pixel buffer", needed, got: pixels.len() });
        }
        let range = self.value_range();
        for (src, dst) in samples.chunks_exact(per).zip(pixels.chunks_exact_mut(per)) {
            for (k, plane) in src.chunks_exact(h * w).enumerate() {
                for (p, &v) in plane.iter().enumerate() {
                    dst[p * c + k] = crate::files::to_u8(v, range);
                }
            }
        }
        Ok(images)
    }

    /// Checks `req` against the card and fills in the card's defaults, before any work; encodes
    /// the prompts.
    fn resolve(&mut self, req: &Request) -> Result<Resolved> {
        let mut r = self.check(req)?;
        let start = Instant::now();
        if let Some(encoder) = &mut self.text {
            let cond = encoder.encode(req.prompt.as_deref().unwrap_or(""))?;
            // Unguided, as diffusers, the negative prompt is not encoded.
            let guided = match r.guidance != 1.0 {
                true => {
                    let null = encoder.encode(req.negative_prompt.as_deref().unwrap_or(""))?;
                    let pair = ndarray::concatenate(ndarray::Axis(0), &[cond.view(), null.view()])
                        .map_err(|e| Error::Inference(e.to_string()))?;
                    Some([null, pair])
                }
                false => None,
            };
            r.text = Some(Prompts { cond, guided });
            r.text_time = start.elapsed();
        }
        Ok(r)
    }

    /// [`resolve`](Pipeline::resolve) but the prompts.
    fn check(&self, req: &Request) -> Result<Resolved> {
        let card = &self.card;
        let d = &card.defaults;
        let kind = match req.sampler {
            Some(k) => k,
            None => d.sampler.as_deref().unwrap_or("ddim").parse()?,
        };
        let steps = req.steps.or(d.steps).unwrap_or(4);
        let requested = req.guidance.or(d.guidance).unwrap_or(1.0);
        if !requested.is_finite() || requested < 0.0 {
            return Err(Error::config("guidance", format!("expected a finite scale >= 0, got {requested}")));
        }
        // The scale of classifier-free guidance; a model with the scale distilled in takes it
        // as an input instead.
        let mut guidance = if self.card_values.embeds_guidance() { 1.0 } else { requested };
        let texts = [("prompt", &req.prompt), ("negative-prompt", &req.negative_prompt)];
        if let Some((field, _)) = texts.iter().find(|(_, t)| t.is_some()).filter(|_| self.text.is_none()) {
            return Err(Error::config(
                *field,
                "this model takes no text: its card has no [text_encoder] (an ONNX Stable Diffusion folder has text_encoder/ and tokenizer/)",
            ));
        }
        if self.text.is_some() {
            if req.context.is_some() {
                return Err(Error::config("context", "this model makes its context from the prompt: give a prompt"));
            }
            // diffusers guides a text model only above 1 (SD-Turbo runs with 0).
            if guidance <= 1.0 {
                guidance = 1.0;
            }
        }
        let opts = SamplerOptions { eta: req.eta.or(d.eta).unwrap_or(0.0) };
        let start = match (&req.init, req.strength, req.init_sigma) {
            (Some(_), Some(_), Some(_)) => {
                return Err(Error::config("init-sigma", "give a strength or an init σ, not both"))
            }
            (Some(_), None, Some(sigma)) => Start::Sigma(sigma),
            // diffusers' defaults: img2img 0.8, inpainting 1.
            (Some(_), s, None) => Start::Strength(s.unwrap_or(if req.mask.is_some() { 1.0 } else { 0.8 })),
            (None, Some(_), _) => {
                return Err(Error::config("strength", "applies to image-to-image: give an init image"))
            }
            (None, None, Some(_)) => {
                return Err(Error::config("init-sigma", "applies to image-to-image: give an init image"))
            }
            (None, None, None) => Start::Noise,
        };
        let (probe, first) = sampler_for(card, kind, steps, &opts, start).map_err(|e| match e {
            Error::Config { field, message } if field.starts_with("scheduler.") => {
                Error::Card { path: card.file.clone(), message: format!("{field}: {message}") }
            }
            other => other,
        })?;
        let total = probe.timesteps().len() - first;
        drop(probe);

        let [c, h, w] = [card.image.channels, card.image.height, card.image.width];
        if let Some(init) = &req.init {
            check_batch("init", init, [c, h, w], self.num_images(req), "the model's [image] space")?;
            let bad = init.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(Error::Tensor {
                    what: "init".into(),
                    message: format!("holds {bad} non-finite values (NaN or Inf)"),
                });
            }
        }
        if let Some(mask) = &req.mask {
            if req.init.is_none() {
                return Err(Error::config("mask", "inpainting needs the image to keep parts of: give an init"));
            }
            check_batch("mask", mask, [1, h, w], self.num_images(req), "the model's [image] size")?;
            if let Some(bad) = mask.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                return Err(Error::Tensor {
                    what: "mask".into(),
                    message: format!("holds {bad}; expected values in [0, 1] (1: regenerate, 0: keep)"),
                });
            }
        }
        match (card.model.inpainting, &req.masked_init) {
            (true, _) if req.mask.is_none() => {
                return Err(Error::config(
                    "mask",
                    "this is an inpainting model ([model] inpainting): give an init and a mask",
                ))
            }
            (true, None) if self.decoder.is_some() => {
                return Err(Error::config(
                    "masked_init",
                    "a latent inpainting model needs the masked init's latents (Pipeline::masked_init)",
                ))
            }
            (true, Some(m)) => {
                check_batch("masked_init", m, [c, h, w], self.num_images(req), "the model's [image] space")?
            }
            (false, Some(_)) => {
                return Err(Error::config(
                    "masked_init",
                    "applies to inpainting models ([model] inpainting), which take the masked init as input channels",
                ))
            }
            _ => {}
        }
        if let Some(noise) = &req.noise {
            let want = [c, h, w];
            if noise.shape()[1..] != want || noise.shape()[0] == 0 {
                return Err(Error::Tensor {
                    what: "noise".into(),
                    message: format!("expected shape [batch, {c}, {h}, {w}], found {:?}", noise.shape()),
                });
            }
            let bad = noise.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(Error::Tensor {
                    what: "noise".into(),
                    message: format!("holds {bad} non-finite values (NaN or Inf), expected finite unit-variance noise"),
                });
            }
        }
        self.check_labels(req)?;
        let null = card.classes.as_ref().and_then(|c| c.null);
        let conditional = card.model.inputs.class_labels.is_some();
        let inputs = self.denoiser.conditioning_inputs();
        let conditioning = self.card_values.for_request(inputs, &req.conditioning, requested)?;
        let mut nulls = Vec::new();
        if guidance != 1.0 && self.text.is_none() {
            if inputs.is_empty() && (null.is_none() || !conditional) {
                return Err(Error::config(
                    "guidance",
                    "classifier-free guidance needs a class-conditional model whose card names a null class ([classes] null), or conditioning inputs with null values",
                ));
            }
            if conditional && null.is_none() {
                return Err(Error::config(
                    "guidance",
                    "the unconditional branch needs a null class: add null to [classes]",
                ));
            }
            if let Some(name) = self.card_values.missing_null(inputs) {
                return Err(Error::config(
                    "guidance",
                    format!("conditioning input {name:?} has no null value for the unconditional branch: add null = ... to [model.conditioning.{name}]"),
                ));
            }
            nulls = self.card_values.nulls().expect("checked above");
        }
        if guidance != 1.0 && self.text.is_some() && !inputs.is_empty() {
            nulls = self.card_values.nulls().ok_or_else(|| {
                Error::config(
                    "guidance",
                    "the card's conditioning inputs need null values for the unconditional branch",
                )
            })?;
        }
        Ok(Resolved {
            kind,
            steps,
            total,
            start,
            first,
            guidance,
            requested,
            opts,
            images: self.num_images(req),
            conditioning,
            nulls,
            text: None,
            text_time: Duration::ZERO,
        })
    }

    /// The sampler loop into `samples`, image `i` at `samples[i·C·H·W..]`.
    fn run_into(
        &mut self,
        req: &Request,
        r: &Resolved,
        samples: &mut [f32],
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<RunInfo> {
        let per = self.image_len();
        let needed = r.images.saturating_mul(per);
        if samples.len() < needed {
            return Err(Error::BufferTooSmall { what: "sample buffer", needed, got: samples.len() });
        }
        let mut images = samples[..needed].chunks_exact_mut(per);
        self.run(req, r, on_step, &mut |done| {
            images.next().expect("one chunk per image").copy_from_slice(done.image);
            ControlFlow::Continue(())
        })
    }

    /// The sampler loop, image by image, each handed to `on_image` when done.
    fn run(
        &mut self,
        req: &Request,
        r: &Resolved,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
        on_image: &mut dyn FnMut(&Finished) -> ControlFlow<()>,
    ) -> Result<RunInfo> {
        let n = r.images;
        let guided = r.guidance != 1.0;
        let batching = self.options.guidance_batching.for_threads(self.denoiser.threads());
        if guided && batching == GuidanceBatching::Batched {
            self.denoiser.prepare(2)?;
        }
        let null = self.card.classes.as_ref().and_then(|c| c.null);
        let conditional = self.card.model.inputs.class_labels.is_some();
        // A σ-conditioned model takes the noisy sample as it is (its preconditioning is in the graph).
        let sigma_model = matches!(self.card.model.inputs.time(), TimeInput::Sigma(_));
        let Scratch { x, x_in, out, x0, init, noise: unit, inpaint_in, guided: pair, extra, extra_null, extra_pair } =
            &mut self.scratch;
        let c = x.shape()[1];
        let (guidance, total) = (r.guidance, r.total);
        let (mut decode_time, mut previews_time) = (Duration::ZERO, Duration::ZERO);
        let (ctx, ctx_null, ctx_pair) = match &r.text {
            Some(Prompts { cond, guided: Some([null, pair]) }) => (Some(cond), Some(null), Some(pair)),
            Some(Prompts { cond, guided: None }) => (Some(cond), Some(cond), Some(cond)),
            None => (req.context.as_ref(), req.context.as_ref(), req.context.as_ref()),
        };
        let first = r.first;
        for i in 0..n {
            let index = req.first_image + i;
            let (mut sampler, _) = sampler_for(&self.card, r.kind, r.steps, &r.opts, r.start)?;
            let mut noise = SeededNoise::new(req.seed, index as u64, 1);
            match &req.noise {
                Some(given) => x.assign(&given.slice(s![i..i + 1, .., .., ..])),
                None => noise.fill(x),
            }
            if req.noise.is_some() {
                // Stochastic samplers still need a stream: give them one that does not
                // repeat the user's noise.
                noise = SeededNoise::new(req.seed ^ 0x9e37_79b9_7f4a_7c15, index as u64, 1);
            }
            match &req.init {
                // The noise goes onto the image at the first timestep run.
                Some(given) => {
                    init.assign(&one_of(given, i));
                    unit.assign(x);
                    // diffusers' inpainting starts from pure noise at strength 1.
                    if req.mask.is_some() && r.start == Start::Strength(1.0) {
                        let sigma0 = sampler.init_noise_sigma() as f32;
                        x.mapv_inplace(|v| v * sigma0);
                    } else {
                        sampler.add_noise(init, unit, first, x);
                    }
                }
                None => {
                    let sigma0 = sampler.init_noise_sigma() as f32;
                    x.mapv_inplace(|v| v * sigma0);
                }
            }
            // An inpainting model's mask and masked init stay in its input for the whole run.
            if let (Some(input), Some(mask)) = (inpaint_in.as_mut(), &req.mask) {
                let masked = req.masked_init.as_ref().map(|m| one_of(m, i));
                edit::fill_inpaint_input(input, c, one_of(mask, i), masked, init);
            }
            // Labels were checked in `resolve`: one per image (cycled), else the null class.
            let label = match &req.classes {
                Some(l) => Some(l[index % l.len()]),
                None if conditional => null,
                None => None,
            };
            // An image drawn as the null class with no other conditioning is its own
            // unconditional branch: guidance would change nothing.
            let guided_image =
                guided && (r.text.is_some() || !r.conditioning.is_empty() || (label.is_some() && label != null));
            conditioning::fill(extra, &r.conditioning, index, 0);
            if guided_image {
                conditioning::fill(extra_null, &r.nulls, index, 0);
                conditioning::fill(extra_pair, &r.conditioning, index, 0);
                conditioning::fill(extra_pair, &r.nulls, index, 1);
            }
            let labels = label.map(|l| [l]);
            let null_labels = label.and(null).map(|n| [n]);
            let pair_labels = label.zip(null).map(|(l, n)| [l, n]);
            for k in first..sampler.timesteps().len() {
                let t = sampler.timesteps()[k];
                let start = Instant::now();
                x_in.assign(x);
                if !sigma_model {
                    sampler.scale_model_input(x_in, k);
                }
                let model_in: &Array4<f32> = match inpaint_in.as_mut() {
                    Some(input) => {
                        input.slice_mut(s![.., ..c, .., ..]).assign(x_in);
                        input
                    }
                    None => x_in,
                };
                let cond = branch(&labels, ctx, extra);
                let null = branch(&null_labels, ctx_null, extra_null);
                let both = Conditions {
                    class_labels: pair_labels.as_ref().map(|l| &l[..]),
                    context: ctx_pair,
                    extra: extra_pair,
                };
                let predict = |denoiser: &mut Denoiser,
                               pair: &mut guidance::Scratch,
                               x: &Array4<f32>,
                               out: &mut Array4<f32>|
                 -> Result<()> {
                    match guided_image {
                        true => {
                            let call = guidance::Call { x, t, branches: [cond, null], pair: both, scale: guidance };
                            pair.predict(denoiser, batching, &call, out)
                        }
                        false => denoiser.predict_with(x, t, &cond, out),
                    }
                };
                match self.canvas.as_mut() {
                    None => predict(&mut self.denoiser, pair, model_in, out)?,
                    // MultiDiffusion: every window of the canvas, their predictions blended.
                    Some(cv) => cv.predict(model_in, out, |x, o| predict(&mut self.denoiser, pair, x, o))?,
                }
                let bad = out.iter().filter(|v| !v.is_finite()).count();
                if bad > 0 {
                    return Err(Error::NonFinite { step: k + 1 - first, total, timestep: t, count: bad });
                }
                let step = k + 1 - first;
                let preview = req.preview_every > 0 && (step.is_multiple_of(req.preview_every) || step == total);
                let mut preview_time = Duration::ZERO;
                if preview {
                    let started = Instant::now();
                    sampler.predict_x0(out, k, x, x0);
                    preview_time = started.elapsed();
                }
                sampler.step(out, k, x, &mut noise);
                // An inpainting model keeps the init itself; a model without a mask input gets it
                // put back after every step.
                if let (Some(mask), None) = (&req.mask, inpaint_in.as_ref()) {
                    // The kept part: the init at the next step's noise level, or itself at the end.
                    let kept: &Array4<f32> = match k + 1 < sampler.timesteps().len() {
                        true => {
                            sampler.add_noise(init, unit, k + 1, x_in);
                            x_in
                        }
                        false => init,
                    };
                    edit::keep_unmasked(x, kept, one_of(mask, i));
                }
                let elapsed = start.elapsed().saturating_sub(preview_time);
                let started = Instant::now();
                let pixels = match (preview, &self.linear, self.preview.as_mut().or(self.decoder.as_mut())) {
                    (true, Some(map), _) => Some(map.decode(x0)),
                    (true, None, Some(d)) => Some(d.decode(x0)?),
                    _ => None,
                };
                if preview {
                    previews_time += preview_time + started.elapsed();
                }
                let shown = match preview {
                    true => Some(pixels.as_deref().unwrap_or(x0.as_slice().expect("scratch arrays are contiguous"))),
                    false => None,
                };
                let info = StepInfo { image: index, step, total, elapsed, preview: shown };
                if on_step(&info).is_break() {
                    return Err(Error::Cancelled { step });
                }
            }
            let sample = x.as_slice().expect("scratch arrays are contiguous");
            let decoded = match self.decoder.as_mut() {
                Some(d) => {
                    let start = Instant::now();
                    let pixels = d.decode(x)?;
                    decode_time += start.elapsed();
                    Some(pixels)
                }
                None => None,
            };
            let done = Finished { index, image: decoded.as_deref().unwrap_or(sample), sample };
            if on_image(&done).is_break() {
                return Err(Error::Cancelled { step: total });
            }
        }
        let stages = Stages { text_encoder: r.text_time, decoder: decode_time, previews: previews_time };
        Ok(RunInfo { images: n, sampler: r.kind, steps: r.steps, timesteps: total, guidance: r.requested, stages })
    }

    /// Checks the request's class labels against the card.
    fn check_labels(&self, req: &Request) -> Result<()> {
        let classes = self.card.classes.as_ref();
        let conditional = self.card.model.inputs.class_labels.is_some();
        match (&req.classes, conditional) {
            (Some(_), false) => Err(Error::config("class", "this model is not class-conditional")),
            (Some(l), true) if l.is_empty() => Err(Error::config("class", "expected at least one class label")),
            (Some(l), true) => {
                let names = classes.map(|c| c.names.len() as i64).unwrap_or(i64::MAX);
                let null = classes.and_then(|c| c.null);
                if let Some(bad) = l.iter().find(|&&v| !((0..names).contains(&v) || Some(v) == null)) {
                    return Err(Error::config("class", format!("label {bad} is out of range 0..{}", names - 1)));
                }
                Ok(())
            }
            (None, true) => match classes.and_then(|c| c.null) {
                Some(_) => Ok(()),
                None => {
                    Err(Error::config("class", "this model is class-conditional without a null class: choose a class"))
                }
            },
            (None, false) => Ok(()),
        }
    }
}

/// The card as the load options change it: the decoder replaced, the size set. Returns the card
/// the denoiser runs at: the same, or with the model's own size when the canvas is tiled.
fn amend(card: &mut ModelCard, options: &LoadOptions) -> Result<ModelCard> {
    if let Some(dir) = &options.decoder {
        card.replace_decoder(dir)?;
    }
    let own = card.clone();
    if let Some(size) = options.size {
        resize(card, size)?;
    }
    Ok(match options.tile_overlap {
        Some(_) => own,
        None => card.clone(),
    })
}

/// Sets the card's `[image]` size to give outputs of `[width, height]` pixels.
fn resize(card: &mut ModelCard, [width, height]: [usize; 2]) -> Result<()> {
    let scale = card.decoder.as_ref().map_or(1, |d| d.scale);
    for (field, v) in [("width", width), ("height", height)] {
        if v == 0 || v % scale != 0 || v / scale > 8192 {
            return Err(Error::config(
                field,
                format!(
                    "expected a multiple of {scale} (the decoder's pixels per latent), 1 to {} pixels, got {v}",
                    8192 * scale
                ),
            ));
        }
    }
    card.image.width = width / scale;
    card.image.height = height / scale;
    Ok(())
}

/// The sampler `kind` for the card's model (on the sampler's timesteps, or on σ for a
/// σ-conditioned model), and the index of its first timestep to run: 0, or where image-to-image
/// at a strength starts.
fn sampler_for(
    card: &ModelCard,
    kind: SamplerKind,
    steps: usize,
    opts: &SamplerOptions,
    start: Start,
) -> Result<(Box<dyn sampler::Sampler>, usize)> {
    let sigma_model = matches!(card.model.inputs.time(), TimeInput::Sigma(_));
    if let Start::Sigma(sigma) = start {
        return Ok((sampler::build_from_sigma(kind, &card.scheduler, steps, opts, sigma, sigma_model)?, 0));
    }
    if let (Start::Strength(s), SamplerKind::Lcm, false) = (start, kind, sigma_model) {
        sampler::check_strength(s)?;
        return Ok((Box::new(sampler::lcm::Lcm::with_strength(&card.scheduler, steps, s)?), 0));
    }
    let built = match sigma_model {
        false => sampler::build(kind, &card.scheduler, steps, opts)?,
        true => sampler::build_for_sigma_model(kind, &card.scheduler, steps, opts)?,
    };
    let first = match start {
        Start::Strength(s) => sampler::img2img_start(built.order(), steps, s)?,
        _ => 0,
    };
    Ok((built, first))
}

/// One image's call inputs: its label (if any), the shared context and its conditioning values.
fn branch<'a>(
    label: &'a Option<[i64; 1]>,
    context: Option<&'a ArrayD<f32>>,
    extra: &'a [ArrayD<f32>],
) -> Conditions<'a> {
    Conditions { class_labels: label.as_ref().map(|l| &l[..]), context, extra }
}
