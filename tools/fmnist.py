"""Fashion-MNIST loading and preprocessing.

Source: Debian's package `dataset-fashion-mnist` (IDX files under
/usr/share/datasets/fashion-mnist, originally from Zalando Research, MIT licence).

Preprocessing (documented in README "Models"):
  * pad 28x28 -> 32x32 with background (0),
  * scale uint8 [0, 255] -> float [-1, 1] (value_range recorded in each model card),
  * outlier report: blank images, saturated images, exact duplicates,
  * augmentation at training time: random horizontal flip.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

DEFAULT_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
VALUE_RANGE = (-1.0, 1.0)


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: expected an IDX file of uint8 (magic 0x0000 0x08), got {zero:#x} {dtype_code:#x}")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} bytes")
    return arr.reshape(dims)


def load_split(split: str, root: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> uint8 [N,32,32], 2 pixels of background on every side."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected [N,28,28] images, got {images.shape}")
    return np.pad(images, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [0,255] -> float32 [-1,1]."""
    lo, hi = VALUE_RANGE
    return (images_u8.astype(np.float32) / 255.0) * (hi - lo) + lo


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model range -> uint8 pixels, the same mapping the Rust runtime uses (round half away from zero, clamp)."""
    lo, hi = VALUE_RANGE
    y = (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0
    return np.floor(y + 0.5).astype(np.uint8)


@dataclass
class OutlierReport:
    n: int
    blank: list[int]
    saturated: list[int]
    duplicate_groups: list[list[int]]

    def summary(self) -> str:
        dups = sum(len(g) - 1 for g in self.duplicate_groups)
        return (f"{self.n} images: {len(self.blank)} blank, {len(self.saturated)} saturated, "
                f"{len(self.duplicate_groups)} groups of exact duplicates ({dups} redundant copies)")


def find_outliers(images_u8: np.ndarray, blank_max: int = 8, saturated_frac: float = 0.9) -> OutlierReport:
    """Blank: no pixel above `blank_max`. Saturated: more than `saturated_frac` of pixels at 255.
    Duplicates: byte-identical images (grouped by hash)."""
    flat = images_u8.reshape(images_u8.shape[0], -1)
    blank = np.nonzero(flat.max(axis=1) <= blank_max)[0].tolist()
    saturated = np.nonzero((flat == 255).mean(axis=1) > saturated_frac)[0].tolist()
    groups: dict[bytes, list[int]] = {}
    for i, row in enumerate(flat):
        groups.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), []).append(i)
    dup = [g for g in groups.values() if len(g) > 1]
    return OutlierReport(flat.shape[0], blank, saturated, dup)


def prepare(split: str, root: str = DEFAULT_DIR, drop_outliers: bool = True):
    """Returns (float32 [N,1,32,32] in [-1,1], int64 labels, report). Blank and saturated images
    and the redundant copies of duplicates are dropped from the training data when asked."""
    images, labels = load_split(split, root)
    report = find_outliers(images)
    keep = np.ones(images.shape[0], dtype=bool)
    if drop_outliers:
        keep[report.blank] = False
        keep[report.saturated] = False
        for g in report.duplicate_groups:
            keep[g[1:]] = False
    x = to_model_range(pad_to_32(images[keep]))[:, None]
    return x, labels[keep], report


def random_hflip(batch, generator=None):
    """Torch batch [B,C,H,W]: flips each image left-right with probability 1/2."""
    import torch

    flip = torch.rand(batch.shape[0], generator=generator, device="cpu") < 0.5
    flip = flip.to(batch.device)
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


if __name__ == "__main__":
    for split in ("train", "test"):
        x, y, rep = prepare(split)
        print(f"{split}: {rep.summary()}; kept {x.shape[0]}; range [{x.min():.2f}, {x.max():.2f}]")
