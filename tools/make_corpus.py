"""Writes tests/fixtures/corpus/: real-world ONNX exports, random weights, tiny configs.

    python3 tools/make_corpus.py [--out tests/fixtures/corpus] [--only NAME ...]
    python3 tools/make_corpus.py --size bench   # into target/corpus-bench: the benchmarks' sizes

`--size tiny` (the default) writes the committed fixtures that `cargo test` checks; `--size bench`
writes the same architectures at sizes that do real work per call (32x32 latents and images,
77 text tokens, realistic widths, up to a few tens of MB each) for tools/bench_corpus.py; those
are not committed.

Each model gets a folder NAME/ with `model.onnx` (and `model.onnx_data` for the external-data
export), its reference inputs `input_<i>_<graph input>.npy` in graph-input order, the output
`output.npy` that onnxruntime computes from them, and a `model.toml` card where the card format
describes the model. Everything is seeded: running it twice writes the same inputs and weights
(the protobuf bytes may differ between torch versions; the pins are in tools/requirements.txt).

The corpus (see tests/corpus.rs for what edge-diffuse checks on it):

  unet2d_legacy         diffusers UNet2DModel, torch.onnx.export(dynamo=False), opset 17
  unet2d_dynamo         the same model, dynamo exporter, opset 18
  unet2d_cond_legacy    diffusers UNet2DConditionModel (cross-attention), legacy, opset 17
  unet2d_cond_dynamo    the same model, dynamo exporter, opset 18
  unet2d_external       unet2d_legacy re-saved with its weights in model.onnx_data
  consistency_edm       a consistency-model UNet in the layout of openai's consistency_models
                        (GroupNorm as InstanceNormalization between reshapes, AveragePool
                        downsampling, Einsum attention) wrapped as D(x; sigma) with EDM
                        preconditioning, plus a per-image `difficulty` added to the time embedding
  dit_legacy            diffusers DiTTransformer2DModel, class-conditional, legacy, opset 17
  sd3_dynamo            diffusers SD3Transformer2DModel (flow matching), dynamo, opset 18
  vae_decoder_legacy    diffusers AutoencoderKL's decoder as latent -> image, legacy, opset 17
  taesd_decoder_legacy  a TAESD-style tiny decoder (Conv, ReLU, Tanh, Upsample), legacy, opset 17
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 2  # reference calls run at batch 2, so a batch axis fixed at 1 anywhere would show
SEED = 22

# The two sizes of every architecture: "tiny" for the test fixtures (whose bytes must not
# change), "bench" for the benchmarks.
SIZES = {
    "tiny": dict(
        unet=dict(hw=16, channels=(16, 32), layers=1, groups=8, head=8,
                  down=("DownBlock2D", "AttnDownBlock2D"), up=("AttnUpBlock2D", "UpBlock2D")),
        cond=dict(hw=8, channels=(16, 32), groups=8, head=8, tokens=7, context=32,
                  down=("CrossAttnDownBlock2D", "DownBlock2D"), up=("UpBlock2D", "CrossAttnUpBlock2D")),
        dit=dict(hw=8, heads=2, head_dim=8, layers=2, groups=8),
        sd3=dict(hw=8, heads=2, head_dim=8, layers=2, context=32, caption=16, pooled=16, tokens=5, pos=16),
        vae=dict(hw=8, channels=(16, 32), groups=8, layers=1),
        taesd=dict(hw=8, ch=16)),
    "bench": dict(
        unet=dict(hw=32, channels=(64, 128, 128, 128), layers=2, groups=32, head=32,
                  down=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
        cond=dict(hw=32, channels=(64, 128, 256), groups=32, head=8, tokens=77, context=768,
                  down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        dit=dict(hw=32, heads=6, head_dim=64, layers=6, groups=32),
        sd3=dict(hw=32, heads=6, head_dim=64, layers=4, context=768, caption=384, pooled=768, tokens=77, pos=32),
        vae=dict(hw=16, channels=(64, 128, 256, 256), groups=32, layers=2),
        taesd=dict(hw=32, ch=64)),
}
SIZE = SIZES["tiny"]


# ---------------------------------------------------------------------------------------------
# Our own modules: the consistency-model UNet and the TAESD-style decoder.

def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GroupNorm the way older exports spell it: InstanceNormalization over [B, G, rest]."""
    b = x.shape[0]
    y = F.instance_norm(x.reshape(b, groups, -1), eps=1e-5).reshape(x.shape)
    return y * weight[None, :, None, None] + bias[None, :, None, None]


class GN(nn.Module):
    def __init__(self, ch: int, groups: int = 8):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(ch))
        self.bias = nn.Parameter(0.1 * torch.randn(ch))

    def forward(self, x):
        return group_norm(x, self.groups, self.weight, self.bias)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.n1, self.c1 = GN(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)  # scale-shift, as in openai's ResBlock
        self.n2, self.c2 = GN(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class EinsumAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 2):
        super().__init__()
        self.heads, self.norm = heads, GN(ch)
        self.qkv, self.proj = nn.Conv1d(ch, 3 * ch, 1), nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(c // self.heads))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
        return x + self.proj(a).reshape(b, c, h, w)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConsistencyUNet(nn.Module):
    """F(c_in x, c_noise, difficulty): two resolutions, AveragePool down, nearest up."""

    def __init__(self, ch: int = 3, base: int = 16):
        super().__init__()
        temb = 4 * base
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.difficulty = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(ch, base, 3, padding=1)
        self.down1 = ResBlock(base, base, temb)
        self.down2 = ResBlock(base, 2 * base, temb)
        self.attn_mid = EinsumAttention(2 * base)
        self.mid = ResBlock(2 * base, 2 * base, temb)
        self.up2 = ResBlock(4 * base, base, temb)
        self.up_conv = nn.Conv2d(base, base, 3, padding=1)
        self.up1 = ResBlock(2 * base, base, temb)
        self.out_norm, self.out = GN(base), nn.Conv2d(base, ch, 3, padding=1)

    def forward(self, x, c_noise, difficulty):
        emb = self.time(timestep_embedding(c_noise, self.base))
        emb = emb + self.difficulty(timestep_embedding(difficulty * 1000.0, self.base))
        h0 = self.down1(self.inp(x), emb)
        h1 = self.down2(F.avg_pool2d(h0, 2), emb)
        h = self.mid(self.attn_mid(h1), emb)
        h = self.up2(torch.cat([h, h1], dim=1), emb)
        h = self.up_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


class EDMDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise): the preconditioning is in the graph."""

    def __init__(self, sigma_data: float = 0.5):
        super().__init__()
        # One channel at 128x128: the image of the example card.
        self.sigma_data, self.net = sigma_data, ConsistencyUNet(ch=1)

    def forward(self, noisy, sigma, difficulty):
        sd2 = self.sigma_data**2
        s = sigma[:, None, None, None]
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s * s + sd2)
        c_in = 1.0 / torch.sqrt(s * s + sd2)
        c_noise = 0.25 * torch.log(sigma)
        return c_skip * noisy + c_out * self.net(c_in * noisy, c_noise, difficulty)


class TaesdBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return F.relu(self.conv(x) + x)


class TaesdDecoder(nn.Module):
    """TAESD's decoder layout, narrower: tanh clamp, conv blocks, two nearest 2x upsamples."""

    def __init__(self, latent: int = 4, ch: int = 16, out: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(latent, ch, 3, padding=1), nn.ReLU(), TaesdBlock(ch),
            nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1, bias=False), TaesdBlock(ch),
            nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1, bias=False), TaesdBlock(ch),
            nn.Conv2d(ch, out, 3, padding=1))

    def forward(self, latent):
        return self.body(torch.tanh(latent / 3.0) * 3.0)


# ---------------------------------------------------------------------------------------------
# diffusers models, wrapped so that the graph returns one tensor.

class Sample(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args, return_dict=False)[0]


class VaeDecode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def unet2d():
    from diffusers import UNet2DModel
    c = SIZE["unet"]
    return UNet2DModel(sample_size=c["hw"], in_channels=3, out_channels=3, layers_per_block=c["layers"],
                       block_out_channels=c["channels"], down_block_types=c["down"],
                       up_block_types=c["up"], norm_num_groups=c["groups"], attention_head_dim=c["head"])


def unet2d_cond():
    from diffusers import UNet2DConditionModel
    c = SIZE["cond"]
    return UNet2DConditionModel(sample_size=c["hw"], in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=c["channels"],
                                down_block_types=c["down"],
                                up_block_types=c["up"],
                                cross_attention_dim=c["context"], attention_head_dim=c["head"],
                                norm_num_groups=c["groups"])


def dit():
    from diffusers import DiTTransformer2DModel
    c = SIZE["dit"]
    return DiTTransformer2DModel(num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=4,
                                 out_channels=4, num_layers=c["layers"], sample_size=c["hw"], patch_size=2,
                                 num_embeds_ada_norm=10, norm_num_groups=c["groups"])


def sd3():
    from diffusers import SD3Transformer2DModel
    c = SIZE["sd3"]
    return SD3Transformer2DModel(sample_size=c["hw"], patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=c["layers"], attention_head_dim=c["head_dim"],
                                 num_attention_heads=c["heads"], joint_attention_dim=c["context"],
                                 caption_projection_dim=c["caption"], pooled_projection_dim=c["pooled"],
                                 pos_embed_max_size=c["pos"])


def vae_decoder():
    from diffusers import AutoencoderKL
    c = SIZE["vae"]
    n = len(c["channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=c["channels"],
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=c["layers"], norm_num_groups=c["groups"], sample_size=16)
    return VaeDecode(vae)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random weights, larger than diffusers' zero-initialized output layers, so that every
    layer shows in the output (a zero conv_out would make any runtime "match")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Export and reference.

def export(model, args, path, names, output, dynamic, dynamo, opset):
    """`dynamic`: input name -> axes that are symbolic (the batch), named `batch`."""
    tmp = path + ".tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=64)
            # `Sample.forward(*args)`: torch.export names that one parameter `args`.
            shapes = {"args": tuple(({0: batch} if n in dynamic else None) for n in names)}
            prog = torch.onnx.export(model, tuple(args), dynamo=True, opset_version=opset, input_names=names,
                                     output_names=[output], dynamic_shapes=shapes, external_data=False,
                                     verbose=False)
            prog.save(tmp)
        else:
            axes = {n: {0: "batch"} for n in dynamic}
            axes[output] = {0: "batch"}
            torch.onnx.export(model, tuple(args), tmp, input_names=names, output_names=[output],
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
    os.replace(tmp, path)


def reference(folder: str, onnx_path: str, inputs: dict[str, np.ndarray]):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    order = [i.name for i in sess.get_inputs()]
    assert sorted(order) == sorted(inputs), (order, list(inputs))
    for i, name in enumerate(order):
        np.save(os.path.join(folder, f"input_{i}_{name}.npy"), inputs[name])
    out = sess.run(None, inputs)[0]
    np.save(os.path.join(folder, "output.npy"), out.astype(np.float32))
    return out


def strip_node_metadata(path: str):
    """Drops the dynamo exporter's per-node provenance (namespace, class hierarchy, fx node: half
    the file) to keep the fixture small; the graph is unchanged. unet2d_dynamo and sd3_dynamo
    keep theirs, so the loader still sees it."""
    m = onnx.load(path)
    for node in m.graph.node:
        del node.metadata_props[:]
    onnx.save(m, path)


def with_external_data(src: str, dst: str):
    m = onnx.load(src)
    onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)


def write(folder: str, name: str, text: str):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def card(name: str, about: str, inputs: list[str], image: tuple[int, int, int], extra: str = "",
         conditioning: str = "") -> str:
    """`conditioning`: `[model.conditioning.NAME]` tables, placed after `[model.inputs]`."""
    c, h, w = image
    lines = [f"# {about}", "# Random weights: a loading and parity fixture, not a model that makes images.",
             "[model]", f'name = "{name}"', 'onnx = "model.onnx"', "", "[model.inputs]", *inputs, "",
             *([conditioning] if conditioning else []), "[image]", f"channels = {c}", f"height = {h}",
             f"width = {w}", "", ""]
    return "\n".join(lines) + extra


DDPM_SCHED = '[scheduler]\nnum_train_timesteps = 1000\nbeta_schedule = "linear"\nprediction_type = "epsilon"\n'


def rng_inputs(seed: int):
    r = np.random.default_rng(seed)
    return lambda *shape: r.standard_normal(shape).astype(np.float32), r


def build(name: str, out_root: str):
    folder = os.path.join(out_root, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    path = os.path.join(folder, "model.onnx")
    randn, r = rng_inputs(SEED + sum(map(ord, name)))
    torch.manual_seed(SEED)
    b = BATCH
    if name in ("unet2d_legacy", "unet2d_dynamo", "unet2d_external"):
        model = Sample(randomize(unet2d(), SEED))
        hw = SIZE["unet"]["hw"]
        x, t = randn(b, 3, hw, hw), np.full([b], 417.0, np.float32)
        inputs = {"sample": x, "timestep": t}
        if name == "unet2d_external":
            legacy = os.path.join(folder, "legacy.onnx")
            export(model, [torch.from_numpy(x), torch.from_numpy(t)], legacy, ["sample", "timestep"], "out_sample",
                   ["sample", "timestep"], dynamo=False, opset=17)
            with_external_data(legacy, path)
            os.remove(legacy)
        else:
            export(model, [torch.from_numpy(x), torch.from_numpy(t)], path, ["sample", "timestep"], "out_sample",
                   ["sample", "timestep"], dynamo=name == "unet2d_dynamo", opset=18 if "dynamo" in name else 17)
        exporter = {"unet2d_dynamo": "dynamo exporter, opset 18"}.get(name, "legacy exporter, opset 17")
        about = f"diffusers UNet2DModel, {hw}x{hw} RGB, {exporter}" + (
            ", weights in model.onnx_data" if name == "unet2d_external" else "")
        write(folder, "model.toml", card(name, about, ['sample = "sample"', 'timestep = "timestep"'], (3, hw, hw),
                                         DDPM_SCHED))
    elif name in ("unet2d_cond_legacy", "unet2d_cond_dynamo"):
        model = Sample(randomize(unet2d_cond(), SEED + 1))
        c = SIZE["cond"]
        hw = c["hw"]
        x, t, ctx = randn(b, 4, hw, hw), np.full([b], 250, np.int64), randn(b, c["tokens"], c["context"])
        names = ["sample", "timestep", "encoder_hidden_states"]
        inputs = dict(zip(names, [x, t, ctx]))
        dynamo = name.endswith("dynamo")
        export(model, [torch.from_numpy(v) for v in inputs.values()], path, names, "out_sample", names,
               dynamo=dynamo, opset=18 if dynamo else 17)
        if dynamo:
            strip_node_metadata(path)
        about = (f"diffusers UNet2DConditionModel, {hw}x{hw}x4 latent, {c['tokens']} tokens of {c['context']}, int64 timestep, "
                 + ("dynamo exporter, opset 18" if dynamo else "legacy exporter, opset 17"))
        write(folder, "model.toml", card(name, about, ['sample = "sample"', 'timestep = "timestep"',
                                                       'encoder_hidden_states = "encoder_hidden_states"'],
                                         (4, hw, hw), DDPM_SCHED))
    elif name == "consistency_edm":
        model = randomize(EDMDenoiser(), SEED + 2)
        x = 2.0 * randn(b, 1, 128, 128)
        sigma = np.array([2.5, 2.5], np.float32)[:b]  # one σ per call, as a sampler gives it
        difficulty = np.array([0.25, 0.75], np.float32)[:b]
        names = ["noisy", "sigma", "difficulty"]
        inputs = dict(zip(names, [x, sigma, difficulty]))
        export(model, [torch.from_numpy(v) for v in inputs.values()], path, names, "denoised", names,
               dynamo=False, opset=17)
        about = ("A consistency-model UNet (openai consistency_models layout: GroupNorm as "
                 "InstanceNormalization, AveragePool, Einsum attention) as D(x; sigma) with EDM "
                 "preconditioning in the graph (sigma_data 0.5), plus a per-image difficulty; legacy exporter, opset 17")
        extra = ('[scheduler]\nsigma_min = 0.002\nsigma_max = 80.0\nsigma_data = 0.5\nrho = 7.0\nprediction_type = "sample"\n\n'
                 '[defaults]\nsampler = "consistency"\nsteps = 1\n')
        write(folder, "model.toml", card(name, about, ['sample = "noisy"', 'sigma = "sigma"'], (1, 128, 128), extra,
                                         "[model.conditioning.difficulty]\ndefault = 0.5  # one per image\n"))
    elif name == "dit_legacy":
        model = Sample(randomize(dit(), SEED + 3))
        hw = SIZE["dit"]["hw"]
        x, t, y = randn(b, 4, hw, hw), np.full([b], 601, np.int64), np.array([3, 10], np.int64)[:b]
        names = ["hidden_states", "timestep", "class_labels"]
        inputs = dict(zip(names, [x, t, y]))
        export(model, [torch.from_numpy(v) for v in inputs.values()], path, names, "out_sample", names,
               dynamo=False, opset=17)
        classes = ", ".join(f'"class{i}"' for i in range(10))
        extra = f'[classes]\nnames = [{classes}]\nnull = 10\n\n' + DDPM_SCHED
        write(folder, "model.toml", card(name, f"diffusers DiTTransformer2DModel, {hw}x{hw}x4 latent, 10 classes + null, "
                                         "legacy exporter, opset 17",
                                         ['sample = "hidden_states"', 'timestep = "timestep"',
                                          'class_labels = "class_labels"'], (4, hw, hw), extra))
    elif name == "sd3_dynamo":
        model = Sample(randomize(sd3(), SEED + 4))
        c = SIZE["sd3"]
        hw = c["hw"]
        x, ctx, pooled = randn(b, 4, hw, hw), randn(b, c["tokens"], c["context"]), randn(b, c["pooled"])
        t = np.full([b], 750.0, np.float32)
        names = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
        inputs = dict(zip(names, [x, ctx, pooled, t]))
        export(model, [torch.from_numpy(v) for v in inputs.values()], path, names, "out_sample", names,
               dynamo=True, opset=18)
        extra = ('[scheduler]\nnum_train_timesteps = 1000\nshift = 3.0\n\n'
                 '[defaults]\nsampler = "flow_euler"\nsteps = 4\n')
        write(folder, "model.toml", card(name, f"diffusers SD3Transformer2DModel (flow matching), {hw}x{hw}x4 latent, "
                                         f"{c['tokens']} tokens of {c['context']}, pooled {c['pooled']}, dynamo exporter, opset 18",
                                         ['sample = "hidden_states"', 'timestep = "timestep"',
                                          'encoder_hidden_states = "encoder_hidden_states"'], (4, hw, hw), extra,
                                         f"[model.conditioning.pooled_projections]\ndefault = 0.0  # [{c['pooled']}] per image\n"))
    elif name == "vae_decoder_legacy":
        model = randomize(vae_decoder(), SEED + 5)
        hw = SIZE["vae"]["hw"]
        inputs = {"latent": randn(b, 4, hw, hw)}
        export(model, [torch.from_numpy(inputs["latent"])], path, ["latent"], "image", ["latent"],
               dynamo=False, opset=17)
    elif name == "taesd_decoder_legacy":
        model = randomize(TaesdDecoder(ch=SIZE["taesd"]["ch"]), SEED + 6)
        hw = SIZE["taesd"]["hw"]
        inputs = {"latent": randn(b, 4, hw, hw)}
        export(model, [torch.from_numpy(inputs["latent"])], path, ["latent"], "image", ["latent"],
               dynamo=False, opset=17)
    else:
        raise SystemExit(f"unknown corpus model {name}")
    with torch.no_grad():
        want = model(*[torch.from_numpy(v) for v in inputs.values()]).numpy()
    got = reference(folder, path, inputs)
    err = float(np.abs(got - want).max() / max(1e-12, np.abs(want).max()))
    # At bench sizes, random weights through many attention layers make a chaotic function (nearly
    # one-hot softmaxes), where float32 runtimes part further; those files only time calls.
    assert err < (1e-4 if SIZE is SIZES["tiny"] else 1e-1), f"{name}: onnxruntime and torch differ by {err:.2e}"
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("model.onnx"))
    opset = next(o.version for o in onnx.load(path, load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    print(f"{name:22s} opset {opset:2d} {size / 1024:7.1f} KiB  torch vs onnxruntime {err:.1e}  "
          f"output {list(got.shape)}")


NAMES = ["unet2d_legacy", "unet2d_dynamo", "unet2d_cond_legacy", "unet2d_cond_dynamo", "unet2d_external",
         "consistency_edm", "dit_legacy", "sd3_dynamo", "vae_decoder_legacy", "taesd_decoder_legacy"]

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                 "fixtures", "corpus"))
    p.add_argument("--only", nargs="*", default=NAMES)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    a = p.parse_args()
    SIZE = SIZES[a.size]
    if a.size != "tiny" and a.out == p.get_default("out"):
        a.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "corpus-bench")
    torch.set_num_threads(2)
    for n in a.only:
        build(n, a.out)
