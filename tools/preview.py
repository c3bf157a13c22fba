"""Quick look at a checkpoint: a PyTorch DDIM (teacher) or LCM (student) sampler writing a PNG grid
(rows = classes). The Rust runtime is the real sampler; this is for checking training runs.

    python3 tools/preview.py tools/.runs/fmnist/teacher.pt ddim 50 /tmp/teacher.png
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist  # noqa: E402
from train import cosine_alphas_cumprod, lcm_scalings, load_weights  # noqa: E402


@torch.no_grad()
def sample(model, kind, steps, labels, guidance=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ac = cosine_alphas_cumprod()
    dev = next(model.parameters()).device
    x = torch.randn(labels.shape[0], 1, 32, 32, generator=g).to(dev)
    null = torch.full_like(labels, model.num_classes)
    if kind == "ddim":
        ts = np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1
    else:
        origin = np.arange(1, 51) * 20 - 1
        ts = origin[::-1][:: 50 // steps][:steps]
    for i, t in enumerate(ts):
        a = ac[t].to(dev)
        tt = torch.full((x.shape[0],), float(t), device=dev)
        v = model(x, tt, labels)
        if kind == "ddim" and guidance != 1.0:
            vu = model(x, tt, null)
            v = vu + guidance * (v - vu)
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        eps = (1 - a).sqrt() * x + a.sqrt() * v
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        ap = ac[prev].to(dev) if prev >= 0 else torch.tensor(1.0, device=dev)
        if kind == "ddim":
            x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
        else:
            cs, co = lcm_scalings(torch.tensor(float(t)))
            den = cs.to(dev) * x + co.to(dev) * x0
            noise = torch.randn(x.shape, generator=g).to(dev)
            x = den if prev < 0 else ap.sqrt() * den + (1 - ap).sqrt() * noise
    return x


def grid_png(x, rows, path):
    from PIL import Image

    u8 = fmnist.to_uint8(x.cpu().numpy()[:, 0])
    n, h, w = u8.shape
    cols = n // rows
    img = u8.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
    Image.fromarray(img).save(path)


if __name__ == "__main__":
    ckpt, kind, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_weights(ckpt, dev)
    model.eval()
    labels = torch.arange(10, device=dev).repeat_interleave(8)
    x = sample(model, kind, steps, labels)
    try:
        grid_png(x, 10, out)
    except ImportError:
        np.save(out + ".npy", x.cpu().numpy())
    print(f"wrote {out}")
