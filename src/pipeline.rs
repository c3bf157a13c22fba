//! The pipeline: model card → loaded denoiser → sampler loop → samples.
//!
//! Images are generated one at a time with batch-1 plans: every sampler is per-image, so this
//! gives the same result as a batched run, keeps peak memory at one image, and lets image `i`
//! of a request be reproduced alone (its noise is stream `i` of the seed).

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use ndarray::{s, Array4, ArrayD};

use crate::card::ModelCard;
use crate::denoiser::Denoiser;
pub use crate::denoiser::Precision;
use crate::error::{Error, Result};
use crate::noise::SeededNoise;
use crate::sampler::{self, NoiseSource, SamplerKind, SamplerOptions};

/// How a guided step evaluates its conditional and unconditional branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidanceBatching {
    /// Two batch-1 calls (measured faster with tract on the shipped models; see README).
    #[default]
    TwoCalls,
    /// One batch-2 call.
    Batched,
}

/// Options fixed when the pipeline is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for tract's matrix products (default: the available cores).
    pub threads: usize,
    /// Guided-step strategy.
    pub guidance_batching: GuidanceBatching,
    /// Arithmetic precision of the denoiser (f16 pays off only on CPUs with fp16 arithmetic).
    pub precision: Precision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            guidance_batching: GuidanceBatching::default(),
            precision: Precision::default(),
        }
    }
}

/// What to generate. `None` fields take the card's `[defaults]`.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Seed of the noise streams.
    pub seed: u64,
    /// Number of images (ignored when `noise` is given: its batch sets it).
    pub num_images: usize,
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
}

/// Progress of one model call, for callbacks.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Image index (0-based).
    pub image: usize,
    /// Step within the image (1-based).
    pub step: usize,
    /// Steps per image (model calls in the sampler loop).
    pub total: usize,
    /// Time spent on this step.
    pub elapsed: Duration,
}

/// What a request produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Final samples, `[images, C, H, W]`, in the model's value range.
    pub samples: Array4<f32>,
    /// The sampler that ran.
    pub sampler: SamplerKind,
    /// Steps per image, as requested.
    pub steps: usize,
    /// Sampler loop iterations per image (Heun evaluates 2·steps − 1 times).
    pub timesteps: usize,
    /// Guidance scale applied.
    pub guidance: f32,
}

/// A model loaded once, ready to generate.
pub struct Pipeline {
    card: ModelCard,
    denoiser: Denoiser,
    options: LoadOptions,
}

impl Pipeline {
    /// Loads the model directory `dir` (its `model.toml` and ONNX file).
    pub fn load(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let card = ModelCard::load(dir)?;
        let denoiser = Denoiser::load(&card, options.threads)?;
        Self::from_parts(card, denoiser, options)
    }

    /// Loads from a parsed card and ONNX bytes held in memory (e.g. `include_bytes!`).
    pub fn from_bytes(card: ModelCard, onnx: &[u8], options: LoadOptions) -> Result<Self> {
        let denoiser = Denoiser::from_bytes(onnx, &card, options.threads, card.onnx_path())?;
        Self::from_parts(card, denoiser, options)
    }

    fn from_parts(card: ModelCard, mut denoiser: Denoiser, options: LoadOptions) -> Result<Self> {
        denoiser.set_precision(options.precision);
        // Build the batch-1 plan now so load errors surface here, not at the first image.
        denoiser.prepare(1)?;
        Ok(Pipeline { card, denoiser, options })
    }

    /// The model card.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// The loaded denoiser.
    pub fn denoiser(&self) -> &Denoiser {
        &self.denoiser
    }

    /// Generates images; `on_step` runs after every model call and may stop the run by
    /// returning `ControlFlow::Break(())` (the result is then [`Error::Cancelled`]).
    pub fn generate(
        &mut self,
        req: &Request,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let card = &self.card;
        let d = &card.defaults;
        let kind = match req.sampler {
            Some(k) => k,
            None => d.sampler.as_deref().unwrap_or("ddim").parse()?,
        };
        let steps = req.steps.or(d.steps).unwrap_or(4);
        let guidance = req.guidance.or(d.guidance).unwrap_or(1.0);
        if !guidance.is_finite() || guidance < 0.0 {
            return Err(Error::config("guidance", format!("expected a finite scale >= 0, got {guidance}")));
        }
        let opts = SamplerOptions { eta: req.eta.or(d.eta).unwrap_or(0.0) };
        // Validate the configuration before any work.
        let probe = sampler::build(kind, &card.scheduler, steps, &opts).map_err(|e| match e {
            Error::Config { field, message } if field.starts_with("scheduler.") => {
                Error::Card { path: card.file.clone(), message: format!("{field}: {message}") }
            }
            other => other,
        })?;
        let total = probe.timesteps().len();
        drop(probe);

        let [c, h, w] = [card.image.channels, card.image.height, card.image.width];
        let n = match &req.noise {
            Some(noise) => {
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
                        message: format!(
                            "holds {bad} non-finite values (NaN or Inf), expected finite unit-variance noise"
                        ),
                    });
                }
                noise.shape()[0]
            }
            None => req.num_images.max(1),
        };
        let labels = self.labels(req)?;
        let null = card.classes.as_ref().and_then(|c| c.null);
        let guided = guidance != 1.0;
        if guided && (null.is_none() || labels.is_none()) {
            return Err(Error::config(
                "guidance",
                "classifier-free guidance needs a class-conditional model whose card names a null class ([classes] null)",
            ));
        }
        if guided && self.options.guidance_batching == GuidanceBatching::Batched {
            self.denoiser.prepare(2)?;
        }

        let mut samples = Array4::<f32>::zeros((n, c, h, w));
        let mut x = Array4::<f32>::zeros((1, c, h, w));
        let mut x_in = x.clone();
        let mut out = x.clone();
        let mut out_u = x.clone();
        let mut pair_in = Array4::<f32>::zeros((2, c, h, w));
        let mut pair_out = pair_in.clone();
        for i in 0..n {
            let mut sampler = sampler::build(kind, &card.scheduler, steps, &opts)?;
            let mut noise = SeededNoise::new(req.seed, i as u64, 1);
            match &req.noise {
                Some(given) => x.assign(&given.slice(s![i..i + 1, .., .., ..])),
                None => noise.fill(&mut x),
            }
            if req.noise.is_some() {
                // Stochastic samplers still need a stream: give them one that does not
                // repeat the user's noise.
                noise = SeededNoise::new(req.seed ^ 0x9e37_79b9_7f4a_7c15, i as u64, 1);
            }
            let sigma0 = sampler.init_noise_sigma() as f32;
            x.mapv_inplace(|v| v * sigma0);
            let label = labels.as_ref().map(|l| l[i % l.len()]);
            let timesteps = sampler.timesteps().to_vec();
            for (k, &t) in timesteps.iter().enumerate() {
                let start = Instant::now();
                x_in.assign(&x);
                sampler.scale_model_input(&mut x_in, k);
                let ctx = req.context.as_ref();
                match (guided, label) {
                    (true, Some(label)) if Some(label) != null => {
                        let null = null.expect("checked above");
                        match self.options.guidance_batching {
                            GuidanceBatching::TwoCalls => {
                                self.denoiser.predict(&x_in, t, Some(&[label]), ctx, &mut out)?;
                                self.denoiser.predict(&x_in, t, Some(&[null]), ctx, &mut out_u)?;
                            }
                            GuidanceBatching::Batched => {
                                pair_in.slice_mut(s![0..1, .., .., ..]).assign(&x_in);
                                pair_in.slice_mut(s![1..2, .., .., ..]).assign(&x_in);
                                self.denoiser.predict(&pair_in, t, Some(&[label, null]), ctx, &mut pair_out)?;
                                out.assign(&pair_out.slice(s![0..1, .., .., ..]));
                                out_u.assign(&pair_out.slice(s![1..2, .., .., ..]));
                            }
                        }
                        ndarray::Zip::from(&mut out).and(&out_u).for_each(|c, &u| *c = u + guidance * (*c - u));
                    }
                    _ => {
                        let l = label.map(|l| [l]);
                        self.denoiser.predict(&x_in, t, l.as_ref().map(|l| &l[..]), ctx, &mut out)?;
                    }
                }
                let bad = out.iter().filter(|v| !v.is_finite()).count();
                if bad > 0 {
                    return Err(Error::NonFinite { step: k + 1, total, timestep: t, count: bad });
                }
                sampler.step(&out, k, &mut x, &mut noise);
                let info = StepInfo { image: i, step: k + 1, total, elapsed: start.elapsed() };
                if on_step(&info).is_break() {
                    return Err(Error::Cancelled { step: k + 1 });
                }
            }
            samples.slice_mut(s![i..i + 1, .., .., ..]).assign(&x);
        }
        Ok(Generation { samples, sampler: kind, steps, timesteps: total, guidance })
    }

    fn labels(&self, req: &Request) -> Result<Option<Vec<i64>>> {
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
                Ok(Some(l.clone()))
            }
            (None, true) => match classes.and_then(|c| c.null) {
                Some(null) => Ok(Some(vec![null])),
                None => {
                    Err(Error::config("class", "this model is class-conditional without a null class: choose a class"))
                }
            },
            (None, false) => Ok(None),
        }
    }
}
