//! A card derived from an ONNX Stable Diffusion folder, the layout Hugging Face optimum writes
//! (and onnxruntime's examples use): `model_index.json`, `unet/`, `text_encoder/`, `tokenizer/`,
//! `vae_decoder/` and `scheduler/`. Each part's `config.json` gives what the card needs; a
//! `model.toml` beside `model_index.json` overrides any key of the derived card.

use std::path::Path;

use serde_json::Value;

use super::{DecoderSection, ModelCard};
use crate::error::{Error, Result};

/// The file that marks a folder as an ONNX Stable Diffusion pipeline.
pub(super) const INDEX: &str = "model_index.json";

/// The parts a folder must hold, and what each is.
const PARTS: [(&str, &str); 6] = [
    ("unet/model.onnx", "the denoiser"),
    ("text_encoder/model.onnx", "the text encoder"),
    ("tokenizer/vocab.json", "the tokenizer's vocabulary"),
    ("tokenizer/merges.txt", "the tokenizer's merges"),
    ("vae_decoder/model.onnx", "the VAE decoder"),
    ("scheduler/scheduler_config.json", "the scheduler's configuration"),
];

const LAYOUT: &str = "an ONNX Stable Diffusion folder holds model_index.json, unet/model.onnx, \
text_encoder/model.onnx, tokenizer/{vocab.json, merges.txt, tokenizer_config.json}, \
vae_decoder/model.onnx and scheduler/scheduler_config.json";

/// The card of the folder `dir`, amended by `dir/model.toml` when there is one.
pub(super) fn load(dir: &Path) -> Result<ModelCard> {
    for (part, what) in PARTS {
        let path = dir.join(part);
        if !path.is_file() {
            return Err(Error::Card { path, message: format!("missing ({what}): {LAYOUT}") });
        }
    }
    let unet = config(dir, "unet/config.json")?;
    let vae = config(dir, "vae_decoder/config.json")?;
    let scheduler = config(dir, "scheduler/scheduler_config.json")?;
    let number = |v: &Value, key: &str, file: &str, default: f64| -> Result<f64> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| Error::Card {
                path: dir.join(file),
                message: format!("{key}: expected a number, got {x}"),
            }),
        }
    };
    let in_channels = number(&unet, "in_channels", "unet/config.json", 4.0)?;
    let channels = number(&unet, "out_channels", "unet/config.json", in_channels)?;
    // diffusers' inpainting UNets take the latents, the mask and the masked image's latents.
    let inpainting = in_channels == 2.0 * channels + 1.0;
    let size = match unet.get("sample_size") {
        Some(Value::Array(hw)) => hw.first().and_then(Value::as_f64).unwrap_or(64.0),
        _ => number(&unet, "sample_size", "unet/config.json", 64.0)?,
    };
    // diffusers' VAE halves the size in every down block but the last.
    let blocks = vae.get("block_out_channels").and_then(Value::as_array).map_or(4, |b| b.len().max(1));
    let scale = 1usize << (blocks - 1);
    let scaling = number(&vae, "scaling_factor", "vae_decoder/config.json", 0.18215)?;
    let shift = number(&vae, "shift_factor", "vae_decoder/config.json", 0.0)?;
    // The VAE's training size is where its decoding is known good: tile above it.
    let tile = match vae.get("sample_size") {
        Some(Value::Array(hw)) => hw.first().and_then(Value::as_f64).unwrap_or(512.0),
        _ => number(&vae, "sample_size", "vae_decoder/config.json", 512.0)?,
    };
    let tile = ((tile as usize / scale).max(1)) * scale;
    let sampler = scheduler.get("_class_name").and_then(Value::as_str).and_then(sampler_of);
    let name = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));

    // The name through TOML's own quoting: a folder's name may hold any character.
    let name = toml::Value::String(name.unwrap_or_else(|| "stable-diffusion".into()));
    let mut text = format!(
        "[model]\n\
         name = {name}\n\
         onnx = \"unet/model.onnx\"\n\
         scheduler_config = \"scheduler/scheduler_config.json\"\n\
         inpainting = {inpainting}\n\n\
         [model.inputs]\n\
         sample = \"sample\"\n\
         timestep = \"timestep\"\n\
         encoder_hidden_states = \"encoder_hidden_states\"\n\n\
         [image]  # the latents\n\
         channels = {channels}\n\
         height = {size}\n\
         width = {size}\n\n\
         [text_encoder]\n\
         onnx = \"text_encoder/model.onnx\"\n\
         tokenizer = \"tokenizer\"\n\n\
         [decoder]\n\
         onnx = \"vae_decoder/model.onnx\"\n\
         scaling_factor = {scaling:?}\n\
         shift_factor = {shift:?}\n\
         scale = {scale}\n\
         tile_size = {tile}\n",
        channels = channels as usize,
        size = size as usize,
    );
    // A latent-consistency UNet distilled with guidance takes its scale as an embedding
    // (diffusers' LatentConsistencyModelPipeline, whose default scale is 8.5).
    let lcm = unet.get("time_cond_proj_dim").is_some_and(|d| !d.is_null());
    if let Some(rows) = latent_rgb(channels as usize, scaling) {
        let rows: Vec<String> = rows.iter().map(|r| format!("[{:?}, {:?}, {:?}]", r[0], r[1], r[2])).collect();
        // Inside [decoder], the last table written above.
        text.push_str(&format!("latent_rgb = [{}]\n", rows.join(", ")));
    }
    if lcm {
        text.push_str("\n[model.conditioning.timestep_cond]\nfrom = \"guidance\"\n");
    }
    // The VAE encoder is optional: image-to-image from pixels needs it.
    if dir.join("vae_encoder/model.onnx").is_file() {
        text.push_str("\n[encoder]\nonnx = \"vae_encoder/model.onnx\"\n");
    }
    if sampler.is_some() || lcm {
        text.push_str("\n[defaults]\n");
    }
    if let Some(s) = sampler {
        text.push_str(&format!("sampler = {s:?}\n"));
    }
    if lcm {
        text.push_str("guidance = 8.5\n");
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| Error::Card {
        path: dir.join(INDEX),
        message: format!("the derived card: {}", super::one_line(&e.to_string())),
    })?;
    let amend = dir.join("model.toml");
    let file = if amend.is_file() {
        let own = std::fs::read_to_string(&amend).map_err(|e| Error::io(&amend, e))?;
        let own: toml::Table = toml::from_str(&own)
            .map_err(|e| Error::Card { path: amend.clone(), message: super::one_line(&e.to_string()) })?;
        merge(&mut table, own);
        text = table.to_string();
        amend
    } else {
        dir.join(INDEX)
    };
    let mut card = ModelCard::parse(&table.to_string(), dir, &file)?;
    // The header is not parsed: a path may hold a line break.
    let from = match file.ends_with("model.toml") {
        true => format!("{} and amended by {}", dir.join(INDEX).display(), file.display()),
        false => format!("the ONNX Stable Diffusion folder {}", dir.display()),
    };
    card.derived = Some(format!("# Derived from {}\n{text}", from.replace(['\n', '\r'], " ")));
    Ok(card)
}

/// A part's `config.json` as a JSON object (an empty one when the file is absent: optimum
/// writes them, but the card's defaults fit SD 1.x/2.x without).
/// The decoder folder `dir` (`model.onnx` + `config.json`) in place of `current`: its scaling
/// from the config (diffusers' `AutoencoderTiny` takes the latents as they are, scaling 1), the
/// scale and tile size kept.
pub(super) fn decoder(dir: &Path, current: &DecoderSection) -> Result<DecoderSection> {
    let onnx = dir.join("model.onnx");
    let file = dir.join("config.json");
    for (path, what) in [(&onnx, "the decoder graph"), (&file, "its diffusers config")] {
        if !path.is_file() {
            return Err(Error::Card {
                path: path.clone(),
                message: format!("missing ({what}): a decoder folder holds model.onnx and config.json"),
            });
        }
    }
    let cfg = config(dir, "config.json")?;
    let tiny = cfg.get("_class_name").and_then(Value::as_str) == Some("AutoencoderTiny");
    let factor = |key: &str, default: Option<f64>| -> Result<f32> {
        match (cfg.get(key), default) {
            (None | Some(Value::Null), Some(d)) => Ok(d as f32),
            (Some(x), _) if x.is_number() => Ok(x.as_f64().unwrap_or_default() as f32),
            (None | Some(Value::Null), None) => Err(Error::Card {
                path: file.clone(),
                message: format!("{key}: missing; expected the VAE's {key} (a number)"),
            }),
            (Some(x), _) => {
                Err(Error::Card { path: file.clone(), message: format!("{key}: expected a number, got {x}") })
            }
        }
    };
    let scaling_factor = factor("scaling_factor", tiny.then_some(1.0))?;
    let shift_factor = factor("shift_factor", Some(0.0))?;
    if !(scaling_factor.is_finite() && scaling_factor > 0.0 && shift_factor.is_finite()) {
        return Err(Error::Card {
            path: file,
            message: format!(
                "scaling_factor {scaling_factor} / shift_factor {shift_factor}: expected a finite scaling > 0 and a finite shift"
            ),
        });
    }
    // An absolute path: `card.dir.join` leaves it as it is.
    let onnx = std::path::absolute(&onnx).map_err(|e| Error::io(&onnx, e))?;
    Ok(DecoderSection { onnx, scaling_factor, shift_factor, ..current.clone() })
}

/// The latent-to-RGB factors of the known 4-channel latent spaces, told apart by their VAE's
/// `scaling_factor`: SD 1.x/2.x (0.18215) and SDXL (0.13025). The numbers are ComfyUI's
/// (`comfy/latent_formats.py`, `latent_rgb_factors`), fitted on those VAEs.
fn latent_rgb(channels: usize, scaling: f64) -> Option<[[f32; 3]; 4]> {
    match (channels, scaling) {
        (4, s) if (s - 0.18215).abs() < 1e-6 => Some([
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ]),
        (4, s) if (s - 0.13025).abs() < 1e-6 => Some([
            [0.3920, 0.4054, 0.4549],
            [-0.2634, -0.0196, 0.0653],
            [0.0568, 0.1687, -0.0755],
            [-0.3112, -0.2359, -0.2076],
        ]),
        _ => None,
    }
}

fn config(dir: &Path, file: &str) -> Result<Value> {
    let path = dir.join(file);
    if !path.is_file() {
        return Ok(Value::Object(Default::default()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Error::Card { path, message: "expected a JSON object".into() }),
        Err(e) => Err(Error::Card { path, message: format!("not valid JSON: {e}") }),
    }
}

/// The sampler that runs diffusers' scheduler class `class`, where edge-diffuse has it.
fn sampler_of(class: &str) -> Option<&'static str> {
    Some(match class {
        "EulerAncestralDiscreteScheduler" => "euler_ancestral",
        "EulerDiscreteScheduler" => "euler",
        "DDIMScheduler" => "ddim",
        "DDPMScheduler" => "ddpm",
        "LCMScheduler" => "lcm",
        "HeunDiscreteScheduler" => "heun",
        "DPMSolverMultistepScheduler" => "dpmpp_2m",
        "FlowMatchEulerDiscreteScheduler" => "flow_euler",
        _ => return None,
    })
}

/// `own`'s keys over `base`'s, table by table.
fn merge(base: &mut toml::Table, own: toml::Table) {
    for (key, value) in own {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amendments_replace_keys_and_keep_the_rest_of_their_table() {
        let mut base: toml::Table = toml::from_str("[a]\nx = 1\ny = 2\n[b]\nz = 3\n").unwrap();
        merge(&mut base, toml::from_str("[a]\ny = 5\n[c]\nw = 1\n").unwrap());
        assert_eq!(
            base.to_string(),
            toml::from_str::<toml::Table>("[a]\nx = 1\ny = 5\n[b]\nz = 3\n[c]\nw = 1\n").unwrap().to_string()
        );
    }
}
