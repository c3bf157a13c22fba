//! The model card: `model.toml` beside the ONNX file (format: docs/model-card.md), or derived
//! from an ONNX Stable Diffusion folder (`folder`), which a `model.toml` beside it may amend.
//!
//! The `[scheduler]` table takes diffusers' `scheduler_config.json` keys with the same names and
//! meanings; a key left out takes diffusers' default *for the sampler in use*, which is why every
//! field of [`SchedulerConfig`] is optional and each sampler resolves its own defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

mod folder;
pub use crate::sampler::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

/// The parsed `model.toml`, with paths resolved against the card's directory.
#[derive(Debug, Clone)]
pub struct ModelCard {
    /// Directory holding the card.
    pub dir: PathBuf,
    /// The card file itself.
    pub file: PathBuf,
    /// `[model]`.
    pub model: ModelSection,
    /// `[image]`.
    pub image: ImageSection,
    /// `[classes]`, for class-conditional models.
    pub classes: Option<ClassesSection>,
    /// `[scheduler]`, merged over `model.scheduler_config` when both are given.
    pub scheduler: SchedulerConfig,
    /// `[defaults]`.
    pub defaults: DefaultsSection,
    /// `[text_encoder]`, for models prompted with text.
    pub text_encoder: Option<TextEncoderSection>,
    /// `[decoder]`, for latent models: what turns the final latents into pixels.
    pub decoder: Option<DecoderSection>,
    /// `[encoder]`, for latent models: what turns an image into latents (image-to-image).
    pub encoder: Option<EncoderSection>,
    /// The card's TOML as derived from an ONNX Stable Diffusion folder (with `model.toml`'s
    /// amendments merged in), for `info`; `None` for a card read from `model.toml` alone.
    pub derived: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCard {
    model: ModelSection,
    image: ImageSection,
    classes: Option<ClassesSection>,
    scheduler: Option<toml::Table>,
    #[serde(default)]
    defaults: DefaultsSection,
    text_encoder: Option<TextEncoderSection>,
    decoder: Option<DecoderSection>,
    encoder: Option<EncoderSection>,
}

/// `[text_encoder]`: the graph that turns token ids into the UNet's `encoder_hidden_states`,
/// and its tokenizer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderSection {
    /// The ONNX file, relative to the card: int32 or int64 `input_ids` `[batch, tokens]` in,
    /// the hidden states `[batch, tokens, dim]` as its first output.
    pub onnx: PathBuf,
    /// The tokenizer folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`), relative to
    /// the card.
    pub tokenizer: PathBuf,
}

/// `[decoder]`: the VAE decoder of a latent model, run on `latents / scaling_factor +
/// shift_factor` as diffusers runs it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSection {
    /// The ONNX file, relative to the card: latents `[batch, C, h, w]` in, pixels
    /// `[batch, 3, h·scale, w·scale]` in `[-1, 1]` out.
    pub onnx: PathBuf,
    /// The VAE's `scaling_factor` (SD 1.x/2.x: 0.18215).
    pub scaling_factor: f32,
    /// The VAE's `shift_factor` (SD3, FLUX; 0 for SD 1.x/2.x).
    #[serde(default)]
    pub shift_factor: f32,
    /// Pixels per latent along each axis (8 for SD's VAE).
    pub scale: usize,
    /// Side of the square windows, in pixels, that tiled decoding decodes one at a time (the
    /// VAE's `sample_size`, the size it was trained at); a larger image is tiled unless told
    /// otherwise. Default 512.
    pub tile_size: Option<usize>,
    /// A linear map from the latents (as the denoiser sees them) to RGB in `[-1, 1]`: one row
    /// of 3 factors per latent channel. It makes rough previews at almost no cost
    /// ([`PreviewDecoder::Linear`](crate::pipeline::PreviewDecoder::Linear)); an ONNX folder
    /// with an SD 1.x/2.x or SDXL VAE gets the factors of those latent spaces.
    pub latent_rgb: Option<Vec<[f32; 3]>>,
}

impl DecoderSection {
    /// [`tile_size`](Self::tile_size) or its default.
    pub fn tile(&self) -> usize {
        self.tile_size.unwrap_or(512)
    }
}

/// `[encoder]`: the VAE encoder of a latent model, for image-to-image from pixels. Its latents
/// are `(mean − shift_factor) · scaling_factor` with the `[decoder]`'s factors, as diffusers
/// encodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSection {
    /// The ONNX file, relative to the card: pixels `[batch, 3, H, W]` in `[-1, 1]` in; out the
    /// latent distribution's parameters `[batch, 2·C, H/scale, W/scale]` (mean, then
    /// log-variance: optimum's `latent_parameters`) or the latents themselves `[batch, C, …]`.
    pub onnx: PathBuf,
}

/// `[model]`: the ONNX file and how its inputs are named.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A short name, shown by `info` and in logs.
    pub name: String,
    /// The ONNX file, relative to the card.
    pub onnx: PathBuf,
    /// diffusers' `scheduler_config.json`, relative to the card (optional).
    pub scheduler_config: Option<PathBuf>,
    /// ONNX input names.
    #[serde(default)]
    pub inputs: InputNames,
    /// ONNX output name (default: the model's first output).
    pub output: Option<String>,
    /// `[model.conditioning.NAME]`: further graph inputs and their values, by name.
    #[serde(default)]
    pub conditioning: BTreeMap<String, ConditioningSection>,
    /// An inpainting model (diffusers' 9-channel inpainting UNets): its sample input is the
    /// sample, the mask and the masked init concatenated on channels, `C + 1 + C` of them for
    /// the card's `image.channels` C.
    #[serde(default)]
    pub inpainting: bool,
}

/// `[model.conditioning.NAME]`: a graph input beyond the sample, the time and the class labels
/// (a float per image, a vector, a tensor), and its values. Its dtype and shape are read from the
/// ONNX graph: `[batch]`, `[batch, n]` or `[batch, ...]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditioningSection {
    /// The graph input (default: the table's name).
    pub input: Option<String>,
    /// The value when a request gives none.
    pub default: Option<ConditioningValue>,
    /// The value of the unconditional branch of classifier-free guidance.
    pub null: Option<ConditioningValue>,
    /// Where the value comes from when not from `default` or the request: `"guidance"` is the
    /// guidance-scale embedding of a latent-consistency model distilled with guidance (diffusers'
    /// `timestep_cond`), and such a model runs no classifier-free guidance.
    pub from: Option<ConditioningSource>,
}

/// `[model.conditioning.NAME] from`: a value the pipeline computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditioningSource {
    /// The sinusoidal embedding of `guidance − 1` (`w`), as diffusers'
    /// `LatentConsistencyModelPipeline` feeds `timestep_cond`: `[sin(1000·w·f), cos(1000·w·f)]`
    /// over `f = 10000^(−k/(d/2 − 1))`, `k < d/2`, for an input of `d` values per image.
    Guidance,
}

/// A conditioning value in the card: one number, a list of numbers, or a `.npy` file (float32,
/// relative to the card). A list or a file holds one image's values, or several images' in a
/// row, cycled over the images of a request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ConditioningValue {
    /// One number.
    Number(f64),
    /// Numbers in row-major order.
    List(Vec<f64>),
    /// A `.npy` file, relative to the card.
    File(PathBuf),
}

impl ConditioningSection {
    /// The graph input it binds.
    pub fn input_name<'a>(&'a self, table: &'a str) -> &'a str {
        self.input.as_deref().unwrap_or(table)
    }
}

/// `[model.inputs]`: ONNX input names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputNames {
    /// The noisy sample, float32 `[batch, C, H, W]`.
    #[serde(default = "default_sample")]
    pub sample: String,
    /// The timestep: int64 or float32, `[]`, `[1]` or `[batch]` (default name `timestep`).
    pub timestep: Option<String>,
    /// For σ-conditioned denoisers, in place of `timestep`: the noise level σ, float32 `[]`,
    /// `[1]` or `[batch]`. The graph then gets the noisy sample unscaled (k-diffusion's
    /// D(x; σ)).
    pub sigma: Option<String>,
    /// Class labels, int64 `[batch]` (class-conditional models).
    pub class_labels: Option<String>,
    /// Conditioning embeddings, float32 `[batch, tokens, dim]` (cross-attention models).
    pub encoder_hidden_states: Option<String>,
}

fn default_sample() -> String {
    "sample".into()
}

impl Default for InputNames {
    fn default() -> Self {
        InputNames {
            sample: default_sample(),
            timestep: None,
            sigma: None,
            class_labels: None,
            encoder_hidden_states: None,
        }
    }
}

/// What a denoiser's time input takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeInput<'a> {
    /// The sampler's timestep, into the input of this name (the sample scaled by the sampler).
    Timestep(&'a str),
    /// The noise level σ, into the input of this name (the sample unscaled).
    Sigma(&'a str),
}

impl InputNames {
    /// The time input: `sigma` when the card names one, else `timestep` (default `timestep`).
    pub fn time(&self) -> TimeInput<'_> {
        match &self.sigma {
            Some(name) => TimeInput::Sigma(name),
            None => TimeInput::Timestep(self.timestep.as_deref().unwrap_or("timestep")),
        }
    }
}

/// `[image]`: the sample's shape and value range.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// 1 (grey), 3 (RGB) or 4 (RGBA, or a latent space shown channel-wise).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// The model's value range, mapped linearly to pixels 0..=255 (default `[-1, 1]`).
    #[serde(default = "default_range")]
    pub value_range: [f32; 2],
}

fn default_range() -> [f32; 2] {
    [-1.0, 1.0]
}

/// `[classes]`: class names (index = label) and the null class used for guidance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassesSection {
    /// Names; the label of a name is its index.
    pub names: Vec<String>,
    /// The label that means "no class" (classifier-free guidance, unconditional samples).
    pub null: Option<i64>,
}

/// `[defaults]`: what `sample` uses when a flag is not given.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    /// Sampler name (see [`crate::SamplerKind`]).
    pub sampler: Option<String>,
    /// Number of steps.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (1 = none).
    pub guidance: Option<f32>,
    /// DDIM eta.
    pub eta: Option<f32>,
}

impl ModelCard {
    /// Reads `<dir>/model.toml` (or the card file itself when `path` is a file).
    ///
    /// A directory holding `model_index.json` is an ONNX Stable Diffusion folder (the layout
    /// Hugging Face optimum writes): the card is derived from its parts, and a `model.toml`
    /// beside it, if any, overrides any key of the derived card.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("model.toml"))
        } else {
            (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
        };
        if path.is_dir() && dir.join(folder::INDEX).is_file() {
            return folder::load(&dir);
        }
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::parse(&text, &dir, &file)
    }

    /// Parses card text; `dir` resolves relative paths, `file` names the card in errors.
    pub fn parse(text: &str, dir: &Path, file: &Path) -> Result<Self> {
        let card_err = |message: String| Error::Card { path: file.to_path_buf(), message };
        let raw: RawCard = toml::from_str(text).map_err(|e| card_err(one_line(&e.to_string())))?;
        let mut merged: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        if let Some(json_rel) = &raw.model.scheduler_config {
            let json_path = dir.join(json_rel);
            let json_text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
            let obj: BTreeMap<String, serde_json::Value> = serde_json::from_str(&json_text)
                .map_err(|e| Error::Card { path: json_path.clone(), message: format!("not a JSON object: {e}") })?;
            // Check the file on its own first so errors name the file the key came from.
            scheduler_from_map(obj.clone()).map_err(|message| Error::Card { path: json_path.clone(), message })?;
            merged.extend(obj);
        }
        if let Some(table) = raw.scheduler {
            let value = serde_json::to_value(&table).map_err(|e| card_err(format!("[scheduler]: {e}")))?;
            if let serde_json::Value::Object(obj) = value {
                merged.extend(obj);
            }
        }
        let scheduler = scheduler_from_map(merged).map_err(card_err)?;
        let card = ModelCard {
            dir: dir.to_path_buf(),
            file: file.to_path_buf(),
            model: raw.model,
            image: raw.image,
            classes: raw.classes,
            scheduler,
            defaults: raw.defaults,
            text_encoder: raw.text_encoder,
            decoder: raw.decoder,
            encoder: raw.encoder,
            derived: None,
        };
        card.validate().map_err(card_err)?;
        Ok(card)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let im = &self.image;
        // A latent model's channels are its latent space's, which its decoder turns into RGB.
        let most = if self.decoder.is_some() { 64 } else { 4 };
        if !(1..=most).contains(&im.channels) {
            return Err(format!("image.channels: expected 1 to {most}, got {}", im.channels));
        }
        for (name, v) in [("height", im.height), ("width", im.width)] {
            if v == 0 || v > 8192 {
                return Err(format!("image.{name}: expected 1 to 8192 pixels, got {v}"));
            }
        }
        let [lo, hi] = im.value_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(format!("image.value_range: expected [low, high] with low < high, got [{lo}, {hi}]"));
        }
        if let Some(c) = &self.classes {
            if c.names.is_empty() {
                return Err("classes.names: expected at least one class name".into());
            }
            if self.model.inputs.class_labels.is_none() {
                return Err("classes: the card names classes but [model.inputs] has no class_labels input".into());
            }
            if let Some(null) = c.null {
                if null < 0 {
                    return Err(format!("classes.null: expected a label >= 0, got {null}"));
                }
            }
        }
        let inputs = &self.model.inputs;
        if inputs.sigma.is_some() && inputs.timestep.is_some() {
            return Err("model.inputs: give timestep or sigma (a σ-conditioned model), not both".into());
        }
        let mut bound: Vec<(String, &str)> = [
            Some(("model.inputs.sample".to_string(), inputs.sample.as_str())),
            Some((
                "model.inputs.timestep/sigma".to_string(),
                match inputs.time() {
                    TimeInput::Timestep(n) | TimeInput::Sigma(n) => n,
                },
            )),
            inputs.class_labels.as_deref().map(|n| ("model.inputs.class_labels".to_string(), n)),
            inputs.encoder_hidden_states.as_deref().map(|n| ("model.inputs.encoder_hidden_states".to_string(), n)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (table, c) in &self.model.conditioning {
            let field = format!("model.conditioning.{table}");
            if let Some((other, _)) = bound.iter().find(|(_, n)| *n == c.input_name(table)) {
                return Err(format!("{field}: input {:?} is already bound by {other}", c.input_name(table)));
            }
            if c.from.is_some() && (c.default.is_some() || c.null.is_some()) {
                return Err(format!(
                    "{field}: a value computed from the guidance (from = \"guidance\") takes no default or null"
                ));
            }
            for (key, v) in [("default", &c.default), ("null", &c.null)] {
                let finite = match v {
                    Some(ConditioningValue::Number(x)) => x.is_finite(),
                    Some(ConditioningValue::List(l)) => !l.is_empty() && l.iter().all(|x| x.is_finite()),
                    _ => true,
                };
                if !finite {
                    return Err(format!(
                        "{field}.{key}: expected finite numbers (a number, a non-empty list or a .npy file)"
                    ));
                }
            }
            bound.push((field, c.input_name(table)));
        }
        if let Some(steps) = self.defaults.steps {
            if steps == 0 {
                return Err("defaults.steps: expected at least 1".into());
            }
        }
        if let Some(d) = &self.decoder {
            if !(d.scaling_factor.is_finite() && d.scaling_factor > 0.0) {
                return Err(format!("decoder.scaling_factor: expected a finite number > 0, got {}", d.scaling_factor));
            }
            if !d.shift_factor.is_finite() {
                return Err(format!("decoder.shift_factor: expected a finite number, got {}", d.shift_factor));
            }
            if !(1..=64).contains(&d.scale) {
                return Err(format!("decoder.scale: expected 1 to 64 pixels per latent, got {}", d.scale));
            }
            if let Some(f) = &d.latent_rgb {
                if f.len() != self.image.channels || f.iter().flatten().any(|v| !v.is_finite()) {
                    return Err(format!(
                        "decoder.latent_rgb: expected {} rows (one per latent channel) of 3 finite numbers, got {} rows",
                        self.image.channels,
                        f.len()
                    ));
                }
            }
            if let Some(t) = d.tile_size {
                if t == 0 || t % d.scale != 0 {
                    return Err(format!(
                        "decoder.tile_size: expected a positive multiple of decoder.scale ({}), got {t}",
                        d.scale
                    ));
                }
            }
        }
        if self.encoder.is_some() && self.decoder.is_none() {
            return Err("encoder: an [encoder] needs the [decoder] whose latent space it encodes into".into());
        }
        if self.text_encoder.is_some() && inputs.encoder_hidden_states.is_none() {
            return Err("text_encoder: the card has a text encoder but [model.inputs] has no encoder_hidden_states input for its output".into());
        }
        if let Some(g) = self.defaults.guidance {
            if !g.is_finite() || g < 0.0 {
                return Err(format!("defaults.guidance: expected a finite scale >= 0, got {g}"));
            }
        }
        Ok(())
    }

    /// Puts the decoder folder `dir` in place of the card's decoder: `dir/model.onnx` with
    /// `dir/config.json` (diffusers' `AutoencoderKL` or `AutoencoderTiny` config), e.g. a
    /// TAESD-class tiny decoder. It must turn the same latents into the same number of pixels.
    pub fn replace_decoder(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let Some(current) = &self.decoder else {
            return Err(Error::config(
                "decoder",
                "this model has no decoder to replace: its samples are the images (no [decoder] in its card)",
            ));
        };
        self.decoder = Some(folder::decoder(dir.as_ref(), current)?);
        Ok(())
    }

    /// Channels of the model's sample input: `image.channels`, or `2·C + 1` for an inpainting
    /// model (`[model] inpainting`).
    pub fn sample_channels(&self) -> usize {
        match self.model.inpainting {
            true => 2 * self.image.channels + 1,
            false => self.image.channels,
        }
    }

    /// The ONNX file's full path.
    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join(&self.model.onnx)
    }

    /// Resolves a class given by name or by number to its label.
    pub fn class_label(&self, class: &str) -> Result<i64> {
        let Some(classes) = &self.classes else {
            return Err(Error::config("class", "this model is not class-conditional (its card has no [classes])"));
        };
        if let Some(i) = classes.names.iter().position(|n| n.eq_ignore_ascii_case(class)) {
            return Ok(i as i64);
        }
        if let Ok(i) = class.parse::<i64>() {
            if (0..classes.names.len() as i64).contains(&i) || Some(i) == classes.null {
                return Ok(i);
            }
        }
        Err(Error::config(
            "class",
            format!(
                "unknown class {class:?}; expected one of {} or a label 0..{}",
                classes.names.join(", "),
                classes.names.len() - 1
            ),
        ))
    }
}

/// Deserializes the merged `[scheduler]` keys; on failure, names the key at fault (serde's own
/// message names unknown keys but not a bad value's key).
fn scheduler_from_map(map: BTreeMap<String, serde_json::Value>) -> std::result::Result<SchedulerConfig, String> {
    let whole = serde_json::Value::Object(map.clone().into_iter().collect());
    serde_json::from_value(whole).map_err(|e| {
        for (k, v) in map {
            let one = serde_json::Value::Object([(k.clone(), v)].into_iter().collect());
            if let Err(e) = serde_json::from_value::<SchedulerConfig>(one) {
                return format!("scheduler.{k}: {e}");
            }
        }
        format!("[scheduler]: {e}")
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
