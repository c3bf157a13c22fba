//! Latent text-to-image from an ONNX Stable Diffusion folder (issue 23), against diffusers.
//!
//! `tests/fixtures/sd_tiny/` is a Stable-Diffusion-architecture pipeline with random weights in
//! the folder layout Hugging Face optimum writes (UNet2DConditionModel, CLIPTextModel, the SD VAE
//! decoder, CLIP's tokenizer with its first 1000 merges, SD-Turbo's scheduler), made by
//! `tools/make_sd_pipeline.py`. `tests/fixtures/sd_tiny_reference/` holds what diffusers'
//! `StableDiffusionPipeline` makes of it: for each case of `cases.json`, the starting latents,
//! the final latents and the pixels; and transformers' text encoder output for one prompt.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use edge_diffuse::pipeline::{DecoderTiling, LoadOptions, Pipeline, PreviewDecoder, Request};
use edge_diffuse::runtime::{Denoiser, Graph};
use edge_diffuse::tokenizer::ClipTokenizer;
use edge_diffuse::{Error, ModelCard};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::ReadNpyExt;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model() -> PathBuf {
    root().join("sd_tiny")
}

fn reference(name: &str) -> PathBuf {
    root().join("sd_tiny_reference").join(name)
}

fn npy(path: &Path) -> ArrayD<f32> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ArrayD::<f32>::read_npy(std::io::BufReader::new(f)).unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn cases() -> Value {
    let text = std::fs::read_to_string(reference("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(threads: usize) -> Pipeline {
    Pipeline::load(model(), LoadOptions { threads, ..Default::default() }).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_folder_gives_a_card_with_its_parts() {
    let card = ModelCard::load(model()).unwrap();
    let text = card.text_encoder.as_ref().expect("a text encoder");
    assert_eq!(text.onnx, Path::new("text_encoder/model.onnx"));
    let decoder = card.decoder.as_ref().expect("a decoder");
    assert_eq!((decoder.scale, decoder.scaling_factor, decoder.shift_factor), (8, 0.18215, 0.0));
    assert_eq!([card.image.channels, card.image.height, card.image.width], [4, 8, 8]);
    // SD-Turbo's scheduler class picks the sampler; its keys come from the folder's file.
    assert_eq!(card.defaults.sampler.as_deref(), Some("euler_ancestral"));
    assert_eq!(card.scheduler.timestep_spacing, Some(edge_diffuse::card::TimestepSpacing::Trailing));
    assert!(card.derived.as_deref().unwrap().contains("[decoder]"));
}

#[test]
fn a_model_toml_beside_the_folder_overrides_keys() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model(), dir.path());
    std::fs::write(dir.path().join("model.toml"), "[defaults]\nsteps = 2\n[image]\nheight = 16\n").unwrap();
    let card = ModelCard::load(dir.path()).unwrap();
    assert_eq!(card.defaults.steps, Some(2));
    assert_eq!(card.defaults.sampler.as_deref(), Some("euler_ancestral"), "the derived keys stay");
    assert_eq!([card.image.height, card.image.width], [16, 8]);
    assert!(card.file.ends_with("model.toml"));
}

#[test]
fn any_folder_name_gives_a_card() {
    // A name that Rust's debug quoting would write as TOML cannot read, and a line break that
    // would end a comment.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("we\"ird\u{1}\nname");
    std::fs::create_dir(&dir).unwrap();
    copy_dir(&model(), &dir);
    let card = ModelCard::load(&dir).unwrap();
    assert_eq!(card.model.name, "we\"ird\u{1}\nname");
    assert!(card.derived.unwrap().starts_with("# Derived from"));
}

#[test]
fn the_text_encoder_matches_transformers() {
    let cases = cases();
    let prompt = cases["text_encoder_prompt"].as_str().unwrap();
    let tokenizer = ClipTokenizer::from_folder(model().join("tokenizer")).unwrap();
    let ids = tokenizer.encode(prompt).ids;
    let ids = ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids.iter().map(|&i| i as f32).collect()).unwrap();
    let mut graph = Graph::load(&model().join("text_encoder/model.onnx"), &[ids.shape().to_vec()], 1).unwrap();
    let ours = graph.run(&[ids]).unwrap().swap_remove(0);
    let want = npy(&reference("text_encoder_hidden.npy"));
    assert_eq!(ours.shape(), want.shape());
    let err = rel_err(ours.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(err <= 1e-4, "text encoder vs transformers: relative error {err:e}");
}

/// Runs case `c` and checks the final latents (≤ 1e-4 relative) and the pixels (≤ 1/255).
fn check_case(pipe: &mut Pipeline, c: &Value) {
    let name = c["name"].as_str().unwrap();
    let noise = npy(&reference(&format!("{name}_noise.npy"))).into_dimensionality::<ndarray::Ix4>().unwrap();
    // Image-to-image: the init PNG through the VAE encoder.
    let init = c["init"].as_str().map(|file| {
        let pixels =
            edge_diffuse::files::read_image(&reference(file), pipe.output_shape(), pipe.value_range(), false).unwrap();
        pipe.encode(&pixels).unwrap_or_else(|e| panic!("{name}: encode: {e}"))
    });
    let mask_image = c["mask"].as_str().map(|file| {
        let [_, h, w] = pipe.output_shape();
        edge_diffuse::files::read_mask(&reference(file), [h, w]).unwrap()
    });
    let mask = mask_image.as_ref().map(|m| pipe.mask_from_image(m).unwrap());
    // An inpainting UNet takes the masked image's latents too.
    let masked_init = match (pipe.card().model.inpainting, c["init"].as_str(), &mask_image) {
        (true, Some(file), Some(m)) => {
            let pixels =
                edge_diffuse::files::read_image(&reference(file), pipe.output_shape(), pipe.value_range(), false)
                    .unwrap();
            Some(pipe.masked_init(&pixels, m).unwrap())
        }
        _ => None,
    };
    let req = Request {
        init,
        mask,
        masked_init,
        strength: c["strength"].as_f64(),
        noise: Some(noise),
        prompt: c["prompt"].as_str().map(String::from),
        negative_prompt: c["negative_prompt"].as_str().map(String::from),
        sampler: Some(c["sampler"].as_str().unwrap().parse().unwrap()),
        steps: Some(c["steps"].as_u64().unwrap() as usize),
        guidance: Some(c["guidance"].as_f64().unwrap() as f32),
        eta: Some(c["eta"].as_f64().unwrap() as f32),
        ..Default::default()
    };
    let (mut latents, mut image) = (Vec::new(), Vec::new());
    pipe.generate_each(&req, &mut |_| ControlFlow::Continue(()), &mut |done| {
        latents = done.sample.to_vec();
        image = done.image.to_vec();
        ControlFlow::Continue(())
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = npy(&reference(&format!("{name}_latents.npy")));
    let err = rel_err(&latents, want.as_slice().unwrap());
    assert!(err <= 1e-4, "{name}: final latents vs diffusers: relative error {err:e}");

    // diffusers' pixels are [1, H, W, 3] in [0, 1]; ours [3, H, W] in [-1, 1].
    let want = npy(&reference(&format!("{name}_image.npy")));
    let [_, h, w, c3] = [want.shape()[0], want.shape()[1], want.shape()[2], want.shape()[3]];
    assert_eq!(pipe.output_shape(), [c3, h, w], "{name}: image shape");
    let mut worst = 0f32;
    for k in 0..c3 {
        for y in 0..h {
            for x in 0..w {
                let ours = (image[(k * h + y) * w + x] / 2.0 + 0.5).clamp(0.0, 1.0);
                worst = worst.max((ours - want[[0, y, x, k]]).abs());
            }
        }
    }
    assert!(worst <= 1.0 / 255.0, "{name}: pixels differ from diffusers' by up to {worst}");
}

#[test]
fn the_pipeline_matches_diffusers() {
    let cases = cases();
    let mut pipe = load(1);
    let text_to_image = |c: &&Value| c["unet"].is_null() && c["decoder"].is_null() && c["strength"].is_null();
    for c in cases["cases"].as_array().unwrap().iter().filter(text_to_image) {
        check_case(&mut pipe, c);
    }
}

#[test]
fn image_to_image_through_the_vae_encoder_matches_diffusers() {
    let card = ModelCard::load(model()).unwrap();
    assert_eq!(card.encoder.as_ref().unwrap().onnx, Path::new("vae_encoder/model.onnx"));
    let mut pipe = load(1);
    assert!(pipe.encodes_images());
    let cases = cases();
    let img2img: Vec<&Value> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["strength"].is_number() && c["unet"].is_null())
        .collect();
    assert_eq!(img2img.len(), 4, "two image-to-image and two inpainting cases");
    for c in img2img {
        check_case(&mut pipe, c);
    }
}

#[test]
fn the_cli_starts_a_latent_model_from_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let run = |folder: &Path, out: &Path| {
        common::edge_diffuse()
            .args(["sample", "--model"])
            .arg(folder)
            .args(["--prompt", "a red bicycle at night", "--steps", "2", "--strength", "0.5", "--quiet", "--init"])
            .arg(reference("img2img_init.png"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.path().join("bike.png");
    let done = run(&model(), &out);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(image::open(&out).unwrap().width(), 64);
    // Without vae_encoder/ a PNG cannot become latents: the error says what to give instead.
    let bare = dir.path().join("no-encoder");
    std::fs::create_dir(&bare).unwrap();
    copy_dir(&model(), &bare);
    std::fs::remove_dir_all(bare.join("vae_encoder")).unwrap();
    let failed = run(&bare, &dir.path().join("no.png"));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success() && stderr.contains("VAE encoder") && stderr.contains(".npy"), "{stderr}");
    assert!(!dir.path().join("no.png").exists());
}

fn taesd() -> PathBuf {
    root().join("sd_tiny_taesd")
}

#[test]
fn a_tiny_decoder_replaces_the_vae_as_diffusers_swaps_it_in() {
    let card = {
        let mut card = ModelCard::load(model()).unwrap();
        card.replace_decoder(taesd()).unwrap();
        card
    };
    let d = card.decoder.as_ref().unwrap();
    // AutoencoderTiny takes the latents as they are.
    assert_eq!((d.scaling_factor, d.shift_factor, d.scale), (1.0, 0.0, 8));
    let opts = LoadOptions { threads: 1, decoder: Some(taesd()), ..Default::default() };
    let mut pipe = Pipeline::load(model(), opts).unwrap();
    let cases = cases();
    let tiny: Vec<&Value> = cases["cases"].as_array().unwrap().iter().filter(|c| c["decoder"] == "taesd").collect();
    assert!(!tiny.is_empty());
    for c in tiny {
        check_case(&mut pipe, c);
    }
}

#[test]
fn a_decoder_folder_must_hold_its_parts_and_fit_the_latents() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |d: &Path| LoadOptions { threads: 1, decoder: Some(d.to_path_buf()), ..Default::default() };
    let err = Pipeline::load(model(), opts(dir.path())).err().unwrap().to_string();
    assert!(err.contains("model.onnx") && err.contains("missing"), "{err}");
    copy_dir(&taesd(), dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"_class_name\": \"AutoencoderKL\"}").unwrap();
    let err = Pipeline::load(model(), opts(dir.path())).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("scaling_factor"), "{err}");
    // A decoder that makes another number of pixels per latent: the text encoder's graph is no
    // decoder at all, and its output is named.
    std::fs::write(dir.path().join("config.json"), "{\"scaling_factor\": 1.0}").unwrap();
    std::fs::copy(model().join("unet/model.onnx"), dir.path().join("model.onnx")).unwrap();
    let err = Pipeline::load(model(), opts(dir.path())).err().unwrap().to_string();
    assert!(err.contains("model.onnx"), "{err}");
    // A model without a decoder has none to replace.
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student");
    let err = Pipeline::load(bundled, opts(&taesd())).err().unwrap().to_string();
    assert!(err.starts_with("decoder:"), "{err}");
}

/// One image at `size` pixels decoded with `tiling` in windows of `tile` pixels.
fn decode_at(decoder: Option<PathBuf>, size: usize, tiling: DecoderTiling, tile: Option<usize>) -> Vec<f32> {
    let opts = LoadOptions {
        threads: 1,
        size: Some([size, size]),
        decoder,
        decoder_tiling: tiling,
        decoder_tile: tile,
        ..Default::default()
    };
    let mut pipe = Pipeline::load(model(), opts).unwrap();
    let req = Request { seed: 5, prompt: Some("a tiled harbour".into()), ..Default::default() };
    let g = pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(g.samples.shape(), [1, 3, size, size]);
    g.samples.into_raw_vec_and_offset().0
}

#[test]
fn tiled_decoding_of_a_local_decoder_stays_close_to_the_whole() {
    // A TAESD-class decoder has no normalization or attention, so only the zero padding at a
    // window's inner edges makes a window differ from the whole image; the blend leaves out each
    // window's outer quarter of an overlap. 32×32 latents in windows of 16, overlapping by 4.
    // (Blending over the whole overlap gives a mean error of 0.033 here.)
    let whole = decode_at(Some(taesd()), 256, DecoderTiling::Never, None);
    let tiled = decode_at(Some(taesd()), 256, DecoderTiling::Auto, Some(128));
    let err = rel_err(&tiled, &whole);
    let mean = tiled.iter().zip(&whole).map(|(a, b)| (a - b).abs()).sum::<f32>() / whole.len() as f32;
    assert!(err < 0.08 && mean < 0.015, "tiled vs whole: max relative {err:e}, mean {mean:e}");
    assert_ne!(tiled, whole, "the windows ran");
    // A tile that holds the image is the whole decode.
    assert_eq!(decode_at(Some(taesd()), 256, DecoderTiling::Always, Some(512)), whole);
}

#[test]
fn tiled_vae_decoding_is_seamless() {
    // The SD VAE normalizes over its window, so windows differ from the whole image by a field
    // of their own; the blend must turn from one field to the next with no edge. D = tiled −
    // whole changes from column to column inside a window by little; at a hard cut between
    // windows it would jump.
    let size = 128;
    let tiled = decode_at(None, size, DecoderTiling::Always, Some(64));
    let whole = decode_at(None, size, DecoderTiling::Never, None);
    assert!(tiled.iter().all(|v| v.is_finite()));
    let d: Vec<f32> = tiled.iter().zip(&whole).map(|(a, b)| a - b).collect();
    // Mean |D[x+1] − D[x]| over rows and channels, for each column x, and the same for rows.
    let cols: Vec<f32> = (0..size - 1)
        .map(|x| (0..3 * size).map(|r| (d[r * size + x + 1] - d[r * size + x]).abs()).sum::<f32>() / (3 * size) as f32)
        .collect();
    let rows: Vec<f32> = (0..size - 1)
        .map(|y| {
            let at = |c: usize, y: usize, x: usize| d[(c * size + y) * size + x];
            (0..3 * size).map(|i| (at(i / size, y + 1, i % size) - at(i / size, y, i % size)).abs()).sum::<f32>()
                / (3 * size) as f32
        })
        .collect();
    for (axis, steps) in [("column", &cols), ("row", &rows)] {
        let mut sorted = steps.to_vec();
        sorted.sort_by(f32::total_cmp);
        let (median, worst) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
        // Blended, the worst step is about 1.5 medians here; a hard cut between windows makes 2.
        assert!(worst < 1.75 * median, "a {axis} step of {worst} in the difference from the whole, median {median}");
    }
}

#[test]
fn an_lcm_unet_takes_the_guidance_as_an_embedding() {
    // The folder with the reference's latent-consistency UNet (`time_cond_proj_dim`) and LCM's
    // scheduler in place of its own.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model(), dir.path());
    copy_dir(&reference("lcm"), dir.path());
    let card = ModelCard::load(dir.path()).unwrap();
    let cond = &card.model.conditioning["timestep_cond"];
    assert_eq!(cond.from, Some(edge_diffuse::card::ConditioningSource::Guidance));
    assert_eq!((card.defaults.sampler.as_deref(), card.defaults.guidance), (Some("lcm"), Some(8.5)));

    let mut pipe = Pipeline::load(dir.path(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let cases = cases();
    let lcm: Vec<&Value> = cases["cases"].as_array().unwrap().iter().filter(|c| c["unet"] == "lcm").collect();
    assert!(!lcm.is_empty());
    for c in lcm {
        check_case(&mut pipe, c);
    }
    // Its value is the guidance's: a request cannot give it.
    let mut req = Request { steps: Some(1), ..Default::default() };
    req.conditioning.insert("timestep_cond".into(), ArrayD::zeros(IxDyn(&[32])));
    let err = pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("timestep_cond") && err.contains("guidance"), "{err}");
}

/// diffusers' 9-channel inpainting UNet: the mask and the masked image's latents go in as input
/// channels at every step, and no blending runs.
#[test]
fn an_inpainting_unet_takes_the_mask_and_the_masked_image_as_channels() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model(), dir.path());
    copy_dir(&reference("inpaint_unet"), dir.path());
    let card = ModelCard::load(dir.path()).unwrap();
    assert!(card.model.inpainting);
    assert_eq!((card.image.channels, card.sample_channels()), (4, 9));
    let mut pipe = Pipeline::load(dir.path(), LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let cases = cases();
    let inpaint: Vec<&Value> =
        cases["cases"].as_array().unwrap().iter().filter(|c| c["unet"] == "inpaint_unet").collect();
    assert_eq!(inpaint.len(), 2);
    for c in &inpaint {
        check_case(&mut pipe, c);
    }
    // Without its mask, or without the masked image's latents, it cannot run.
    let init = Some(ndarray::Array4::zeros((1, 4, 8, 8)));
    let err = pipe.generate(&Request { init: init.clone(), ..Default::default() }, &mut |_| ControlFlow::Continue(()));
    let err = err.unwrap_err().to_string();
    assert!(err.contains("inpainting") && err.contains("mask"), "{err}");
    let mask = Some(ndarray::Array4::ones((1, 1, 8, 8)));
    let req = Request { init, mask, ..Default::default() };
    let err = pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("masked_init"), "{err}");

    // The CLI encodes the masked image itself, and the result is the library's.
    let out = dir.path().join("door.png");
    let cli = |init: &Path, out: &Path| {
        common::edge_diffuse()
            .args(["sample", "--quiet", "--threads", "1", "--model"])
            .arg(dir.path())
            .args(["--prompt", "a blue window", "--sampler", "euler", "--steps", "3", "--guidance", "3", "--init"])
            .arg(init)
            .arg("--mask")
            .arg(reference("inpaint_mask.png"))
            .arg("--noise")
            .arg(reference("inpaint9_euler_cfg_noise.npy"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let done = cli(&reference("img2img_init.png"), &out);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let want = npy(&reference("inpaint9_euler_cfg_image.npy"));
    let png = image::open(&out).unwrap().to_rgb8();
    let worst = png.enumerate_pixels().fold(0f32, |m, (x, y, p)| {
        (0..3).fold(m, |m, k| m.max((p[k] as f32 / 255.0 - want[[0, y as usize, x as usize, k]]).abs()))
    });
    assert!(worst <= 1.0 / 255.0 + 0.5 / 255.0, "the CLI's pixels differ from diffusers' by {worst}");
    // Latents as the init leave nothing to encode the masked image from.
    let npy_init = dir.path().join("init.npy");
    ndarray_npy::write_npy(&npy_init, &ndarray::Array4::<f32>::zeros((1, 4, 8, 8))).unwrap();
    let failed = cli(&npy_init, &dir.path().join("no.png"));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success() && stderr.contains("init.npy") && stderr.contains("as an image"), "{stderr}");
    assert!(!dir.path().join("no.png").exists());
}

#[test]
fn the_pipeline_matches_diffusers_on_two_threads() {
    // Guided cases then run both branches at once, each on its own thread.
    let cases = cases();
    let mut pipe = load(2);
    let guided = |c: &&Value| c["guidance"].as_f64().unwrap() > 1.0 && c["unet"].is_null() && c["decoder"].is_null();
    for c in cases["cases"].as_array().unwrap().iter().filter(guided) {
        check_case(&mut pipe, c);
    }
}

#[test]
fn a_prompt_changes_the_image_and_the_same_prompt_repeats_it() {
    let mut pipe = load(1);
    let mut run = |prompt: &str| {
        let req = Request { seed: 3, steps: Some(1), prompt: Some(prompt.into()), ..Default::default() };
        pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap().samples
    };
    let (a, b, a2) = (run("a red bicycle"), run("a blue boat"), run("a red bicycle"));
    assert_eq!(a, a2);
    assert_ne!(a, b);
    assert_eq!(a.shape(), &[1, 3, 64, 64]);
}

#[test]
fn width_and_height_set_the_latent_size() {
    let opts = LoadOptions { threads: 1, size: Some([96, 64]), ..Default::default() };
    let mut pipe = Pipeline::load(model(), opts).unwrap();
    assert_eq!(pipe.output_shape(), [3, 64, 96]);
    let req = Request { steps: Some(1), prompt: Some("a cat".into()), ..Default::default() };
    let out = pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(out.samples.shape(), &[1, 3, 64, 96]);

    let opts = LoadOptions { threads: 1, size: Some([100, 64]), ..Default::default() };
    let err = Pipeline::load(model(), opts).err().expect("100 is not a multiple of 8").to_string();
    assert!(err.starts_with("width:") && err.contains("multiple of 8") && err.contains("100"), "{err}");
}

#[test]
fn a_prompt_to_a_model_without_text_is_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student");
    let mut pipe = Pipeline::load(dir, LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let req = Request { prompt: Some("a shoe".into()), ..Default::default() };
    let err = pipe.generate(&req, &mut |_| ControlFlow::Continue(())).unwrap_err();
    assert!(matches!(&err, Error::Config { field, .. } if field == "prompt"), "{err}");
    assert!(err.to_string().contains("no [text_encoder]"), "{err}");
}

#[test]
fn a_folder_missing_a_part_names_it_and_the_layout() {
    for part in ["vae_decoder/model.onnx", "tokenizer/merges.txt", "scheduler/scheduler_config.json"] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&model(), dir.path());
        std::fs::remove_file(dir.path().join(part)).unwrap();
        let err = ModelCard::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(part) && err.contains("missing") && err.contains("model_index.json"), "{err}");
    }
}

#[test]
fn a_text_encoder_of_another_width_names_both_widths() {
    // The corpus UNet's cross-attention takes 32 features per token.
    let card = ModelCard::load(root().join("corpus/unet2d_cond_legacy")).unwrap();
    let mut denoiser = Denoiser::load(&card, 1).unwrap();
    let err = denoiser.set_context_shape(7, 64).unwrap_err().to_string();
    assert!(err.contains("32") && err.contains("64") && err.contains("cross-attention"), "{err}");
    denoiser.set_context_shape(7, 32).unwrap();
}

#[test]
fn the_cli_writes_a_png_from_a_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bike.png");
    let long = "a red bicycle ".repeat(40);
    let run = common::edge_diffuse()
        .args(["sample", "--model"])
        .arg(model())
        .args(["--prompt", &long, "--steps", "1", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(stderr.matches("warning:").count(), 1, "one warning for the long prompt: {stderr}");
    let png = image::open(&out).unwrap();
    assert_eq!((png.width(), png.height()), (64, 64));

    let bad = common::edge_diffuse()
        .args(["sample", "--model"])
        .arg(model())
        .args(["--prompt", "x", "--width", "60", "--height", "64", "--out"])
        .arg(dir.path().join("no.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("width") && stderr.contains("multiple of 8"), "{stderr}");
    assert!(!dir.path().join("no.png").exists());
}

#[test]
fn the_cli_refuses_a_prompt_for_a_model_without_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shoe.png");
    let run = common::edge_diffuse().args(["sample", "--prompt", "a shoe", "--out"]).arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: --prompt:") && stderr.contains("takes no text"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!out.exists());
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn previews_come_every_n_steps_and_the_last_is_the_image() {
    // Through the tiny decoder, which is also the final decoder here: the last step's x̂₀ is
    // the final latents (Euler ancestral lands on σ = 0), so its preview is the image.
    let opts = LoadOptions { threads: 1, decoder: Some(taesd()), ..Default::default() };
    let mut pipe = Pipeline::load(model(), opts).unwrap();
    let req = Request {
        prompt: Some("a preview".into()),
        steps: Some(3),
        preview_every: 2,
        num_images: 2,
        ..Default::default()
    };
    let len = pipe.image_len();
    let mut previews: Vec<(usize, usize, Vec<f32>)> = Vec::new();
    let mut images = Vec::new();
    pipe.generate_each(
        &req,
        &mut |s| {
            if let Some(p) = s.preview {
                assert_eq!(p.len(), len);
                previews.push((s.image, s.step, p.to_vec()));
            }
            ControlFlow::Continue(())
        },
        &mut |done| {
            images.push(done.image.to_vec());
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    let at: Vec<(usize, usize)> = previews.iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(at, [(0, 2), (0, 3), (1, 2), (1, 3)]);
    for (image, last) in images.iter().zip([&previews[1].2, &previews[3].2]) {
        let err = rel_err(last, image);
        assert!(err < 1e-4, "the last preview against the image: {err:e}");
    }
    assert!(rel_err(&previews[0].2, &previews[1].2) > 1e-3, "an earlier step predicts another image");
    // Without previews the callback gets none.
    let mut any = false;
    pipe.generate(&Request { preview_every: 0, ..req }, &mut |s| {
        any |= s.preview.is_some();
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(!any);
}

/// Linear previews: each latent of x̂₀ is one colour by the card's factors (an SD VAE's, from its
/// scaling factor), filling its 8×8 pixels; the last is the final latents' map.
#[test]
fn linear_previews_colour_each_latent_by_the_cards_factors() {
    let card = ModelCard::load(model()).unwrap();
    let factors = card.decoder.as_ref().unwrap().latent_rgb.clone().expect("an SD VAE's latent_rgb");
    assert_eq!(factors.len(), 4);
    let opts = LoadOptions { threads: 1, preview_decoder: PreviewDecoder::Linear, ..Default::default() };
    let mut pipe = Pipeline::load(model(), opts).unwrap();
    let req = Request { prompt: Some("a preview".into()), steps: Some(2), preview_every: 1, ..Default::default() };
    let mut last = Vec::new();
    let mut latents = Vec::new();
    let run = pipe.generate_each(
        &req,
        &mut |s| {
            last = s.preview.expect("every step").to_vec();
            ControlFlow::Continue(())
        },
        &mut |done| {
            latents = done.sample.to_vec();
            ControlFlow::Continue(())
        },
    );
    let stages = run.unwrap().stages;
    assert!(stages.previews > std::time::Duration::ZERO);
    let [_, h, w] = pipe.output_shape();
    assert_eq!(last.len(), 3 * h * w);
    let (lh, lw) = (h / 8, w / 8);
    for k in 0..3 {
        for (y, x) in [(0, 0), (13, 37), (h - 1, w - 1)] {
            let want: f32 = (0..4).map(|c| latents[(c * lh + y / 8) * lw + x / 8] * factors[c][k]).sum();
            let got = last[(k * h + y) * w + x];
            assert!((got - want.clamp(-1.0, 1.0)).abs() < 1e-5, "channel {k} at {y},{x}: {got} vs {want}");
        }
    }
    // A card without the factors cannot make linear previews: the error says what is missing.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model(), dir.path());
    std::fs::write(dir.path().join("vae_decoder/config.json"), r#"{"scaling_factor": 0.5}"#).unwrap();
    let opts = LoadOptions { threads: 1, preview_decoder: PreviewDecoder::Linear, ..Default::default() };
    let err = Pipeline::load(dir.path(), opts).err().expect("refused").to_string();
    assert!(err.contains("preview-decoder") && err.contains("latent_rgb"), "{err}");
}

#[test]
fn the_cli_writes_previews_through_a_tiny_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lake.png");
    let run = common::edge_diffuse()
        .args(["sample", "--model"])
        .arg(model())
        .args(["--prompt", "a lake", "--steps", "2", "--quiet", "--preview-every", "1", "--preview-decoder"])
        .arg(taesd())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let preview = image::open(dir.path().join("lake-preview.png")).unwrap();
    assert_eq!((preview.width(), preview.height()), (64, 64));
    // A preview decoder that is not a folder of one: the flag is named, nothing is written.
    let out = dir.path().join("no.png");
    let run = common::edge_diffuse()
        .args(["sample", "--model"])
        .arg(model())
        .args(["--prompt", "a lake", "--preview-every", "1", "--preview-decoder"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("model.onnx"), "{stderr}");
    assert!(!out.exists());
}
