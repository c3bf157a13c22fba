"""A realistic-size benchmark model: diffusers' UNet2DModel with the google/ddpm-cifar10-32
architecture (35.7 M parameters, 3×32×32, attention at 16×16) and *random* weights (seeded), exported
to ONNX with a model card. Speed only: its samples are noise. Not committed (143 MB); made on demand.

    python3 tools/make_cifar_unet.py tools/.runs/ddpm-cifar10-random

The architecture is the published config of google/ddpm-cifar10-32 (diffusers' `config.json` of
that repository), written out here so no download is needed.
"""
from __future__ import annotations

import argparse
import os

import torch
from diffusers import UNet2DModel

# google/ddpm-cifar10-32, config.json (architecture keys only).
CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional",
)

CARD = """# google/ddpm-cifar10-32 architecture with random weights (tools/make_cifar_unet.py): for speed only.
[model]
name = "ddpm-cifar10-random"
onnx = "denoiser.onnx"

[model.inputs]
sample = "sample"
timestep = "timestep"

[image]
channels = 3
height = 32
width = 32
value_range = [-1.0, 1.0]

[scheduler]
num_train_timesteps = 1000
beta_schedule = "linear"
beta_start = 0.0001
beta_end = 0.02
prediction_type = "epsilon"
clip_sample = true

[defaults]
sampler = "ddim"
steps = 4
"""


class Wrapped(torch.nn.Module):
    """sample [batch,3,32,32], timestep float32 [batch] → the predicted noise."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    unet = UNet2DModel(**CONFIG).eval()
    # GroupNorm starts at γ = 1, β = 0, which no trained checkpoint keeps; runtimes fold an identity
    # affine away (tract does), so leaving it would time a graph that real models do not have.
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    params = sum(p.numel() for p in unet.parameters())
    os.makedirs(a.out_dir, exist_ok=True)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500.0])
    torch.onnx.export(Wrapped(unet), (x, t), os.path.join(a.out_dir, "denoiser.onnx"), opset_version=17,
                      input_names=["sample", "timestep"], output_names=["out_sample"], dynamo=False,
                      dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}, "out_sample": {0: "batch"}})
    with open(os.path.join(a.out_dir, "model.toml"), "w") as fh:
        fh.write(CARD)
    print(f"wrote {a.out_dir}: {params / 1e6:.2f} M params")


if __name__ == "__main__":
    main()
