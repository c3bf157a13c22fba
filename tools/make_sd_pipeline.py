"""Builds Stable-Diffusion-architecture pipelines with random weights and exports them in the ONNX
folder layout that Hugging Face optimum writes (and onnxruntime's examples use):

    model_index.json
    unet/model.onnx            (+ model.onnx_data when the weights are external) + config.json
    text_encoder/model.onnx    + config.json
    tokenizer/                 vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    vae_decoder/model.onnx     + config.json (scaling_factor, shift_factor)
    vae_encoder/model.onnx     + config.json (pixels -> latent_parameters, the mean and log-variance)
    scheduler/scheduler_config.json

Every config is written out here: nothing comes from a hub.

  --size tiny   a few hundred KB; the test pipeline (tests/fixtures/sd_tiny). Its tokenizer is the
                small CLIP vocabulary of tests/fixtures/tokenizer (CLIP's first 1000 merges).
  --size full   the SD-Turbo architecture (stabilityai/sd-turbo's configs, written out below): the
                SD 2.1 UNet (865.9 M parameters, 512x512 from 64x64 latents), the OpenCLIP ViT-H
                text encoder (23 layers of 1024) and the SD VAE decoder, for the benchmarks
                (about 5 GB; the UNet's and text encoder's weights as external data, one file per
                tensor, as the legacy exporter writes models over 2 GB). Its tokenizer is CLIP's
                full vocabulary from tests/fixtures/tokenizer, with SD 2.x's padding ("!").
                With --reference DIR it also writes diffusers' StableDiffusionPipeline results on
                it (final latents and pixels for fixed prompts and starting latents), for
                tests/sd_pipeline.rs.
  --taesd DIR   also a TAESD-class tiny decoder (diffusers' AutoencoderTiny, random weights) in
                the decoder-folder layout edge-diffuse's --decoder takes (model.onnx +
                config.json); with --reference, diffusers' pipeline decoding through it.

Usage: python3 tools/make_sd_pipeline.py --size tiny --out tests/fixtures/sd_tiny \
           --reference tests/fixtures/sd_tiny_reference --taesd tests/fixtures/sd_tiny_taesd
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_corpus import randomize  # noqa: E402

SEED = 23
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer")
SMALL_TOKENIZER = os.path.join(TOKENIZERS, "small")


def clip_tokenizer(dst: str):
    """CLIP's full vocabulary with SD 2.x's config (pads with "!"), from the tokenizer fixtures."""
    import gzip
    src = os.path.join(TOKENIZERS, "clip")
    os.makedirs(dst)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(os.path.join(src, name + ".gz"), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            shutil.copyfileobj(f, g)
    shutil.copy(os.path.join(src, "tokenizer_config.sd2.json"), os.path.join(dst, "tokenizer_config.json"))

SIZES = {
    "tiny": dict(
        # latent 8x8x4, VAE factor 8 -> 64x64 RGB
        unet=dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    ),
    "full": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  hidden_act="gelu", projection_dim=1024),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=768),
    ),
}

SCHEDULER = {
    # SD-Turbo's scheduler: Euler ancestral on trailing timesteps.
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


class TextEncoder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        out = self.m(input_ids=input_ids.to(torch.int64), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class Unet(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class LcmUnet(nn.Module):
    """An LCM-distilled UNet: the guidance scale's embedding comes in as `timestep_cond`."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.m(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


def taesd(out: str, size: str):
    """A TAESD-class decoder: no normalization or attention, 3x3 convolutions, ReLU and nearest
    upsampling. Its real weights are madebyollin/taesd's; these are random, sized by `size`."""
    from diffusers import AutoencoderTiny

    channels, blocks = ((16,) * 4, (1,) * 4) if size == "tiny" else ((64,) * 4, (3, 3, 3, 1))
    model = AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                            num_encoder_blocks=blocks[::-1], num_decoder_blocks=blocks)
    model = randomize(model, SEED + 4).eval()
    # The decoder's last convolution sets the range: keep the pixels mostly inside [-1, 1].
    with torch.no_grad():
        last = model.decoder.layers[-1]
        last.weight.mul_(0.9)
        last.bias.fill_(0.5)
    shutil.rmtree(out, ignore_errors=True)
    x = torch.randn(1, 4, 8, 8)
    export(VaeDecoder(model), [x], os.path.join(out, "model.onnx"), ["latent_sample"], ["sample"],
           {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: "height", 3: "width"}})
    model.save_config(out)
    with torch.no_grad():
        y = model.decode(torch.randn(1, 4, 16, 16)).sample
    print(f"taesd: {sum(p.numel() for p in model.decoder.parameters())} decoder parameters, "
          f"pixels mean {y.mean():.3f} std {y.std():.3f}, {(y.abs() > 1).float().mean():.1%} clipped")
    return model


class VaeEncoder(nn.Module):
    """optimum's current VAE encoder export: the latent distribution's parameters (mean and
    log-variance, 2 x latent channels), which the pipeline samples or takes the mean of."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


class VaeDecoder(nn.Module):
    """A VAE's decode, AutoencoderKL's or AutoencoderTiny's."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


# The UNet's inputs and dynamic axes, as optimum exports them.
UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]
UNET_AXES = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "steps"},
             "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
             "out_sample": {0: "batch_size", 2: "height", 3: "width"}}


def export(model, args, path, names, outputs, axes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(args), path, input_names=names, output_names=outputs,
                          opset_version=17, dynamo=False, dynamic_axes=axes)


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def build(size: str, out: str, tokenizer_dir: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    c = SIZES[size]
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"))
    elif size == "tiny":
        shutil.copytree(SMALL_TOKENIZER, os.path.join(out, "tokenizer"))
    else:
        clip_tokenizer(os.path.join(out, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    torch.manual_seed(SEED)

    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **c["text"])
    text = randomize(CLIPTextModel(text_cfg), SEED).eval()
    unet = randomize(UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=c["text"]["hidden_size"],
                                          **c["unet"]), SEED + 1).eval()
    n = len(c["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, scaling_factor=0.18215, **c["vae"])
    vae = randomize(vae, SEED + 2).eval()
    # Random norms and attention make the decoder's output large; scale conv_out so the pixels
    # land mostly inside [-1, 1], as a trained decoder's do (a clamped-flat image tests little).
    print(f"parameters: unet {sum(p.numel() for p in unet.parameters())}, text encoder "
          f"{sum(p.numel() for p in text.parameters())}, vae decoder "
          f"{sum(p.numel() for n, p in vae.named_parameters() if not n.startswith(('encoder', 'quant_conv')))}")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.zero_()

    ids = torch.zeros(1, 77, dtype=torch.int32)
    export(TextEncoder(text), [ids], os.path.join(out, "text_encoder", "model.onnx"), ["input_ids"],
           ["last_hidden_state", "pooler_output"],
           {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "last_hidden_state": {0: "batch_size", 1: "sequence_length"}})
    text_cfg.save_pretrained(os.path.join(out, "text_encoder"))

    hw = c["unet"]["sample_size"]
    x = torch.randn(1, 4, hw, hw)
    t = torch.tensor([999], dtype=torch.int64)
    ctx = torch.randn(1, 77, c["text"]["hidden_size"])
    export(Unet(unet), [x, t, ctx], os.path.join(out, "unet", "model.onnx"),
           UNET_INPUTS, ["out_sample"], UNET_AXES)
    unet.save_config(os.path.join(out, "unet"))

    export(VaeDecoder(vae), [x], os.path.join(out, "vae_decoder", "model.onnx"), ["latent_sample"], ["sample"],
           {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: "height", 3: "width"}})
    vae.save_config(os.path.join(out, "vae_decoder"))

    pixels = torch.rand(1, 3, hw * 8, hw * 8) * 2 - 1
    export(VaeEncoder(vae), [pixels], os.path.join(out, "vae_encoder", "model.onnx"), ["sample"],
           ["latent_parameters"],
           {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "latent_parameters": {0: "batch_size", 2: "height_latent", 3: "width_latent"}})
    vae.save_config(os.path.join(out, "vae_encoder"))

    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), SCHEDULER)
    write_json(os.path.join(out, "model_index.json"), {
        "_class_name": "ORTStableDiffusionPipeline",
        "_diffusers_version": "0.36.0",
        "scheduler": ["diffusers", SCHEDULER["_class_name"]],
        "text_encoder": ["optimum", "ORTModelTextEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["optimum", "ORTModelUnet"],
        "vae_decoder": ["optimum", "ORTModelVaeDecoder"],
        "vae_encoder": ["optimum", "ORTModelVaeEncoder"],
    })
    return text, tokenizer, unet, vae


# The reference cases: (name, scheduler class, steps, guidance, prompt, negative prompt, eta).
CASES = [
    ("turbo_1step", "EulerAncestralDiscreteScheduler", 1, 0.0, "a red bicycle", None, 0.0),
    ("ddim_cfg", "DDIMScheduler", 4, 7.5, "a photo of a cat, studio light", "blurry, low quality", 0.0),
    ("euler_cfg", "EulerDiscreteScheduler", 3, 3.0, "an astronaut riding a horse", None, 0.0),
]


def reference(out: str, ref: str, text, tokenizer, unet, vae, tiny=None):
    import diffusers
    from diffusers import StableDiffusionPipeline

    shutil.rmtree(ref, ignore_errors=True)
    os.makedirs(ref)
    hw = unet.config.sample_size
    rng = np.random.default_rng(SEED)
    cases = []
    for name, cls, steps, guidance, prompt, negative, eta in CASES:
        scheduler = getattr(diffusers, cls).from_config(SCHEDULER)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        latents = rng.standard_normal((1, 4, hw, hw)).astype(np.float32)
        kwargs = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                      latents=torch.from_numpy(latents), height=hw * 8, width=hw * 8, eta=eta)
        with torch.no_grad():
            final = pipe(**kwargs, output_type="latent").images.numpy()
            image = pipe(**kwargs, output_type="np").images  # [1, H, W, 3] in [0, 1]
        np.save(os.path.join(ref, f"{name}_noise.npy"), latents)
        np.save(os.path.join(ref, f"{name}_latents.npy"), final.astype(np.float32))
        np.save(os.path.join(ref, f"{name}_image.npy"), image.astype(np.float32))
        sampler = {"EulerAncestralDiscreteScheduler": "euler_ancestral", "DDIMScheduler": "ddim",
                   "EulerDiscreteScheduler": "euler"}[cls]
        cases.append(dict(name=name, sampler=sampler, steps=steps, guidance=guidance, prompt=prompt,
                          negative_prompt=negative, eta=eta))
    # The text encoder alone, as transformers runs it.
    prompt = "a red bicycle"
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text(input_ids=ids).last_hidden_state.numpy()
    np.save(os.path.join(ref, "text_encoder_hidden.npy"), hidden.astype(np.float32))
    cases.append(lcm_reference(ref, text, tokenizer, unet, vae, rng))
    cases.extend(img2img_reference(ref, text, tokenizer, unet, vae, rng))
    cases.extend(inpaint_reference(ref, text, tokenizer, unet, vae, rng))
    if tiny is not None:
        cases.append(taesd_reference(ref, text, tokenizer, unet, tiny, rng))
    cases.extend(inpaint_unet_reference(ref, text, tokenizer, unet, vae))
    write_json(os.path.join(ref, "cases.json"), {"text_encoder_prompt": prompt, "cases": cases})


LCM_SCHEDULER = dict(SCHEDULER, _class_name="LCMScheduler", original_inference_steps=50, timestep_scaling=10.0,
                     timestep_spacing="leading")


def lcm_reference(ref, text, tokenizer, unet, vae, rng):
    """A latent-consistency UNet with guidance distilled in (`time_cond_proj_dim`), written as a
    replacement `unet/` and `scheduler/` for the pipeline folder, and diffusers'
    LatentConsistencyModelPipeline on it (one step: LCM adds no noise after its last step)."""
    import diffusers
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    # from_config would keep the recorded default (`_use_default_values`) over the new key.
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = 32
    lcm = UNet2DConditionModel(**cfg)
    lcm = randomize(lcm, SEED + 3).eval()
    hw = cfg["sample_size"]
    folder = os.path.join(ref, "lcm")
    x, t = torch.randn(1, 4, hw, hw), torch.tensor([999], dtype=torch.int64)
    ctx, w = torch.randn(1, 77, cfg["cross_attention_dim"]), torch.randn(1, 32)
    export(LcmUnet(lcm), [x, t, ctx, w], os.path.join(folder, "unet", "model.onnx"),
           UNET_INPUTS + ["timestep_cond"], ["out_sample"], {**UNET_AXES, "timestep_cond": {0: "batch_size"}})
    lcm.save_config(os.path.join(folder, "unet"))
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), LCM_SCHEDULER)
    scheduler = diffusers.LCMScheduler.from_config(LCM_SCHEDULER)
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=lcm,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = rng.standard_normal((1, 4, hw, hw)).astype(np.float32)
    name, prompt, steps, guidance = "lcm_1step", "a watercolor fox in the snow", 1, 8.5
    kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
                  latents=torch.from_numpy(latents), height=hw * 8, width=hw * 8)
    with torch.no_grad():
        final = pipe(**kwargs, output_type="latent").images.numpy()
        image = pipe(**kwargs, output_type="np").images
    np.save(os.path.join(ref, f"{name}_noise.npy"), latents)
    np.save(os.path.join(ref, f"{name}_latents.npy"), final.astype(np.float32))
    np.save(os.path.join(ref, f"{name}_image.npy"), image.astype(np.float32))
    return dict(name=name, sampler="lcm", steps=steps, guidance=guidance, prompt=prompt, negative_prompt=None,
                eta=0.0, unet="lcm")


# Image-to-image cases: (name, scheduler class, steps, strength, guidance, prompt, negative prompt).
IMG2IMG_CASES = [
    ("img2img_turbo", "EulerAncestralDiscreteScheduler", 2, 0.5, 0.0, "a red bicycle at night", None),
    ("img2img_ddim_cfg", "DDIMScheduler", 4, 0.75, 5.0, "a watercolor harbour", "grey, dull"),
]


SAMPLERS = {"EulerAncestralDiscreteScheduler": "euler_ancestral", "EulerDiscreteScheduler": "euler",
            "DDIMScheduler": "ddim"}


def run_with_given_noise(module, pipeline_cls, parts, ref, name, cls, noise, kwargs):
    """One case of an editing pipeline whose module is `module`: its VAE encoder output taken at
    the mean (edge-diffuse's choice; the pipelines sample it) and its noise `noise`, as a port
    that cannot share torch's generator needs. Writes the noise, the final latents and the
    pixels."""
    import diffusers

    saved = module.retrieve_latents, module.randn_tensor
    try:
        module.retrieve_latents = lambda encoded, generator=None, sample_mode="sample": encoded.latent_dist.mode()
        module.randn_tensor = lambda shape, generator=None, device=None, dtype=None, layout=None: \
            torch.from_numpy(noise).to(dtype)
        scheduler = getattr(diffusers, cls).from_config(SCHEDULER)
        pipe = pipeline_cls(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            final = pipe(**kwargs, output_type="latent").images.numpy()
            out = pipe(**kwargs, output_type="np").images
    finally:
        module.retrieve_latents, module.randn_tensor = saved
    np.save(os.path.join(ref, f"{name}_noise.npy"), noise)
    np.save(os.path.join(ref, f"{name}_latents.npy"), final.astype(np.float32))
    np.save(os.path.join(ref, f"{name}_image.npy"), out.astype(np.float32))


def img2img_reference(ref, text, tokenizer, unet, vae, rng):
    """diffusers' StableDiffusionImg2ImgPipeline from `img2img_init.png` (8-bit, as a PNG reader
    sees it)."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    from PIL import Image

    hw = unet.config.sample_size
    size = hw * 8
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(4 * (xx + yy))], -1)
    png = np.clip((rgb * 0.45 + 0.5) * 255 + rng.standard_normal(rgb.shape) * 6, 0, 255).round().astype(np.uint8)
    Image.fromarray(png).save(os.path.join(ref, "img2img_init.png"))
    image = (png.astype(np.float32) / 255.0)[None]
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet)
    cases = []
    for name, cls, steps, strength, guidance, prompt, negative in IMG2IMG_CASES:
        noise = rng.standard_normal((1, 4, hw, hw)).astype(np.float32)
        kwargs = dict(prompt=prompt, negative_prompt=negative, image=image, strength=strength,
                      num_inference_steps=steps, guidance_scale=guidance)
        run_with_given_noise(img2img, img2img.StableDiffusionImg2ImgPipeline, parts, ref, name, cls, noise, kwargs)
        cases.append(dict(name=name, sampler=SAMPLERS[cls], steps=steps, guidance=guidance, prompt=prompt,
                          negative_prompt=negative, eta=0.0, strength=strength, init="img2img_init.png"))
    return cases


# Inpainting cases: (name, scheduler class, steps, strength, guidance, prompt).
INPAINT_CASES = [
    ("inpaint_euler_cfg", "EulerDiscreteScheduler", 3, 1.0, 3.0, "a red door"),
    ("inpaint_ddim", "DDIMScheduler", 4, 0.75, 0.0, "a lighthouse"),
]


def inpaint_reference(ref, text, tokenizer, unet, vae, rng):
    """diffusers' StableDiffusionInpaintPipeline on a 4-channel UNet (mask blending after every
    step) from `img2img_init.png` and `inpaint_mask.png` (white: regenerate)."""
    from PIL import Image

    hw = unet.config.sample_size
    size = hw * 8
    yy, xx = np.mgrid[0:size, 0:size]
    # A disc, off-centre, with a ragged edge that the latent grid cuts through.
    mask = ((yy - 0.45 * size) ** 2 + (xx - 0.6 * size) ** 2 < (0.3 * size) ** 2 + rng.normal(0, 40, yy.shape))
    Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(ref, "inpaint_mask.png"))
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet)
    return run_inpaint_cases(ref, parts, INPAINT_CASES, rng, {})


def run_inpaint_cases(ref, parts, table, rng, extra):
    """diffusers' StableDiffusionInpaintPipeline on `parts` for each case of `table` (as
    INPAINT_CASES), from `img2img_init.png` and `inpaint_mask.png`, its noise drawn from `rng`;
    the cases for cases.json, each with `extra`'s keys."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint
    from PIL import Image

    hw = parts["unet"].config.sample_size
    size = hw * 8
    image = Image.open(os.path.join(ref, "img2img_init.png")).convert("RGB")
    mask_image = Image.open(os.path.join(ref, "inpaint_mask.png")).convert("L")
    cases = []
    for name, cls, steps, strength, guidance, prompt in table:
        noise = rng.standard_normal((1, 4, hw, hw)).astype(np.float32)
        kwargs = dict(prompt=prompt, image=image, mask_image=mask_image, strength=strength, height=size,
                      width=size, num_inference_steps=steps, guidance_scale=guidance)
        run_with_given_noise(inpaint, inpaint.StableDiffusionInpaintPipeline, parts, ref, name, cls, noise, kwargs)
        cases.append(dict(name=name, sampler=SAMPLERS[cls], steps=steps, guidance=guidance, prompt=prompt,
                          negative_prompt=None, eta=0.0, strength=strength, init="img2img_init.png",
                          mask="inpaint_mask.png", **extra))
    return cases


# Cases of an inpainting UNet (9 input channels): (name, scheduler class, steps, strength, guidance,
# prompt).
INPAINT_UNET_CASES = [
    ("inpaint9_euler_cfg", "EulerDiscreteScheduler", 3, 1.0, 3.0, "a blue window"),
    ("inpaint9_ddim", "DDIMScheduler", 4, 0.75, 0.0, "a stone wall"),
]


def inpaint_unet_reference(ref, text, tokenizer, unet, vae):
    """An inpainting UNet (`in_channels` 9: the latents, the mask and the masked image's latents),
    written as a replacement `unet/` for the pipeline folder (`inpaint_unet/`), and diffusers'
    StableDiffusionInpaintPipeline on it, which then blends nothing. Its own random stream, so the
    cases before it keep their inputs."""
    from diffusers import UNet2DConditionModel

    rng = np.random.default_rng(SEED + 4)
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cfg["in_channels"] = 9
    net = randomize(UNet2DConditionModel(**cfg), SEED + 4).eval()
    hw = cfg["sample_size"]
    folder = os.path.join(ref, "inpaint_unet")
    x, t = torch.randn(1, 9, hw, hw), torch.tensor([999], dtype=torch.int64)
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"])
    export(Unet(net), [x, t, ctx], os.path.join(folder, "unet", "model.onnx"),
           UNET_INPUTS, ["out_sample"], UNET_AXES)
    net.save_config(os.path.join(folder, "unet"))
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=net)
    return run_inpaint_cases(ref, parts, INPAINT_UNET_CASES, rng, {"unet": "inpaint_unet"})


def taesd_reference(ref, text, tokenizer, unet, tiny, rng):
    """SD-Turbo's one step with the tiny decoder in place of the VAE, as diffusers swaps it in."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(SCHEDULER)
    pipe = StableDiffusionPipeline(vae=tiny, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hw = unet.config.sample_size
    latents = rng.standard_normal((1, 4, hw, hw)).astype(np.float32)
    name, prompt = "turbo_taesd", "a lighthouse at dusk"
    kwargs = dict(prompt=prompt, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents),
                  height=hw * 8, width=hw * 8)
    with torch.no_grad():
        final = pipe(**kwargs, output_type="latent").images.numpy()
        image = pipe(**kwargs, output_type="np").images
    np.save(os.path.join(ref, f"{name}_noise.npy"), latents)
    np.save(os.path.join(ref, f"{name}_latents.npy"), final.astype(np.float32))
    np.save(os.path.join(ref, f"{name}_image.npy"), image.astype(np.float32))
    return dict(name=name, sampler="euler_ancestral", steps=1, guidance=0.0, prompt=prompt, negative_prompt=None,
                eta=0.0, decoder="taesd")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--reference", help="also write diffusers' results on the pipeline into this folder")
    p.add_argument("--tokenizer", help="the tokenizer folder to copy (default: tiny, the small vocabulary of "
                                       "the tests; full, CLIP's vocabulary with SD 2.x's padding)")
    p.add_argument("--taesd", help="also write a TAESD-class tiny decoder folder here")
    a = p.parse_args()
    parts = build(a.size, a.out, a.tokenizer)
    tiny = taesd(a.taesd, a.size) if a.taesd else None
    if a.reference:
        reference(a.out, a.reference, *parts, tiny=tiny)
    print(f"wrote {a.out}" + (f" and {a.reference}" if a.reference else ""))


if __name__ == "__main__":
    main()
