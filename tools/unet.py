"""A small class-conditional UNet for 32x32 images (about 2M parameters).

Time enters as a float timestep (0..num_train_timesteps-1) through a sinusoidal embedding inside
the graph, so the exported ONNX takes `timestep` as float32 [batch] and also suits the fractional
timesteps of Euler/Heun samplers. Class labels 0..num_classes-1, and `num_classes` itself is the
null class used for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, cout * 2)  # scale and shift
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 4, groups: int = 8):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, ch * 3, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # Written out instead of scaled_dot_product_attention so the ONNX export is plain MatMul/Softmax.
        attn = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(c // self.heads), dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, base: int = 32, mults=(1, 2, 2), blocks: int = 2,
                 attn_res=(8,), num_classes: int = 10, size: int = 32):
        super().__init__()
        self.config = dict(in_ch=in_ch, base=base, mults=tuple(mults), blocks=blocks,
                           attn_res=tuple(attn_res), num_classes=num_classes, size=size)
        self.num_classes = num_classes
        temb = base * 4
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.class_emb = nn.Embedding(num_classes + 1, temb)
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)

        self.down = nn.ModuleList()
        chans = [base]
        ch, res = base, size
        for i, m in enumerate(mults):
            for _ in range(blocks):
                blk = nn.ModuleList([ResBlock(ch, base * m, temb)])
                ch = base * m
                if res in attn_res:
                    blk.append(Attention(ch))
                self.down.append(blk)
                chans.append(ch)
            if i < len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, temb)
        self.mid_attn = Attention(ch)
        self.mid2 = ResBlock(ch, ch, temb)

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                blk = nn.ModuleList([ResBlock(ch + chans.pop(), base * m, temb)])
                ch = base * m
                if res in attn_res:
                    blk.append(Attention(ch))
                self.up.append(blk)
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample, timestep, class_labels):
        if timestep.dim() == 0:
            timestep = timestep[None]
        timestep = timestep.expand(sample.shape[0])
        emb = self.time_mlp(timestep_embedding(timestep, self.base)) + self.class_emb(class_labels)
        h = self.conv_in(sample)
        skips = [h]
        for blk in self.down:
            if isinstance(blk[0], ResBlock):
                h = blk[0](h, emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[0](h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = blk[0](torch.cat([h, skips.pop()], dim=1), emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[1](blk[0](h))
        return self.conv_out(F.silu(self.norm_out(h)))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
